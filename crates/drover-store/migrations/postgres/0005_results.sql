-- What a run produced (JSON): an inference's completion, its token counts and latency.
ALTER TABLE runs ADD COLUMN result TEXT;
ALTER TABLE jobs ADD COLUMN result TEXT;
