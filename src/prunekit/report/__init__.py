"""``prunekit report``: collect result JSON files into one markdown page with tables and PNG plots."""
