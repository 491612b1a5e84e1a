-- Why: image downloads run in API processes (api/downloads.py), and there may be several. A
-- download is now claimed with a lease its process renews while it runs: another process
-- never starts the same download, and one whose process died is picked up by any API
-- process once the lease has run out, not only at the next start-up.

ALTER TABLE image_downloads ADD COLUMN lease_expires_at timestamptz;
