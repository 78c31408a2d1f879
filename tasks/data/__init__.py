"""The data a run explains: where a table is read from (local, s3://), validation with Great Expectations, the background sample."""
