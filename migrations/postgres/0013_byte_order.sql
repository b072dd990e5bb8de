-- Text is compared byte by byte (collation "C"), as SQLite compares it: the same order on both
-- stores whatever the database's default collation, and index comparisons that are a memcmp
-- instead of a locale call (for UTF-8 text the order is code point order, as C.UTF-8 gives).
-- Every text column at once, so that no comparison ever mixes two collations.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT table_name, column_name FROM information_schema.columns
             WHERE table_schema = current_schema() AND data_type = 'text' AND table_name <> '_sqlx_migrations'
             ORDER BY table_name, ordinal_position
    LOOP
        EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE TEXT COLLATE "C"', c.table_name, c.column_name);
    END LOOP;
END;
$$;
