-- Type and system history (GET /{type}/_history, GET /_history) read versions newest first across resources.
CREATE INDEX resource_versions_by_time ON resource_versions (last_updated);
