-- A reservation may wait for its resource (state PENDING) before it is ACTIVE; the
-- dispatcher reads both, so the partial index covers both.
DROP INDEX reservations_active;
CREATE INDEX reservations_live ON reservations (expires_at) WHERE state IN ('PENDING', 'ACTIVE');
