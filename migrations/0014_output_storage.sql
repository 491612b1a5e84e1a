-- Why: logs at any size (issue 10 part 6, docs/architecture.md §6.1). A job printing 200 MB
-- was stored twice, in its row and rolled up into `builds.output`, and every read of the
-- build or its jobs loaded it whole. Now a job's output is stored once, in one of three forms:
--
-- * `build_jobs.output`: output of at most 1 MiB (marid/output.py ROW_LIMIT), in the row;
-- * `build_jobs.output_blob_key`: a larger output, in the blob store (the reaper finds the
--   column by its name, marid/reaper.py, and keeps the blobs it names);
-- * chunks left in `build_job_output` under the build's attempt, when a larger output ended
--   where no blob store is at hand (a build given up at lease recovery), and for the large
--   outputs this migration moves out of their rows.
--
-- `output_size` is the output's length in UTF-8 bytes once the job has ended. A job that
-- printed more than builds.max_output keeps its head and tail with a line between them
-- saying what was dropped: `output_printed` is what it printed, `output_head` and
-- `output_tail` the bytes kept before and after that line (NULL when nothing was dropped).
--
-- `builds.output` is no longer written: the build's output is its jobs' outputs in order,
-- composed when read. The column stays (NULL) because the view build_rows, and the function
-- build_matches that takes its row type, select it.

ALTER TABLE build_jobs
    ADD COLUMN output_blob_key text,
    ADD COLUMN output_size bigint,
    ADD COLUMN output_printed bigint,
    ADD COLUMN output_head bigint,
    ADD COLUMN output_tail bigint;

CREATE INDEX build_jobs_output_blob_key_idx ON build_jobs (output_blob_key)
    WHERE output_blob_key IS NOT NULL;

UPDATE builds SET output = NULL WHERE output IS NOT NULL;

UPDATE build_jobs SET output_size = octet_length(output), output_printed = octet_length(output)
WHERE output IS NOT NULL;

-- Outputs over 1 MiB leave their rows for chunks of at most 64 KiB, cut on character
-- boundaries, read back in bounded pieces like live output. Byte slices of the value
-- converted once, so the work is linear in its length.
DO $$
DECLARE
    job record;
    data bytea;
    total bigint;
    start bigint;
    stop bigint;
BEGIN
    FOR job IN
        SELECT j.id, b.attempt, j.output FROM build_jobs j JOIN builds b ON b.id = j.build_id
        WHERE octet_length(j.output) > 1048576
    LOOP
        data := convert_to(job.output, 'UTF8');
        total := length(data);
        start := 0;
        WHILE start < total LOOP
            stop := least(start + 65536, total);
            -- Back off continuation bytes (10xxxxxx): never split a character.
            WHILE stop < total AND get_byte(data, stop::integer) & 192 = 128 LOOP
                stop := stop - 1;
            END LOOP;
            INSERT INTO build_job_output (job_id, attempt, byte_offset, text)
            VALUES (job.id, job.attempt, start,
                    convert_from(substring(data FROM (start + 1)::integer
                                           FOR (stop - start)::integer), 'UTF8'))
            ON CONFLICT DO NOTHING;
            start := stop;
        END LOOP;
        UPDATE build_jobs SET output = NULL WHERE id = job.id;
    END LOOP;
END
$$;
