-- A resource's index rows are found by id first: ids differ at once where types are mostly the
-- same, so each insert into these indexes (every write's largest share) compares one column.
CREATE INDEX search_tokens_by_id ON search_tokens (id, type);
DROP INDEX search_tokens_by_resource;
CREATE INDEX search_dates_by_id ON search_dates (id, type);
DROP INDEX search_dates_by_resource;
