"""Image downloads (docs/api.md §12.3), run in the background of the API process.

`POST /images` with a `download_url` records a pending download and starts it here once its
transaction has committed. Every step is recorded in `image_downloads`, so a download left
pending by a stopped or crashed server is started again when the app next starts (or failed,
after MAX_ATTEMPTS starts). The URL is kept encrypted until the download finishes.
http(s) URLs are fetched with aiohttp, sftp URLs with asyncssh; both stream into the blob store.
Every connection, redirects included, goes only where the outbound policy allows
(marid/outbound.py, docs/security.md §3).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import asyncssh
from aiohttp import web
from aiohttp.abc import AbstractResolver
from yarl import URL

from marid import db, images, outbound, webhooks
from marid.api.keys import BLOBS, CIPHER, CONFIG, POOL
from marid.blobs import Blob, BlobStore, BlobTooLarge
from marid.config import parse_duration
from marid.crypto import Cipher, DecryptionError
from marid.uploads import size_text

log = logging.getLogger(__name__)

TIMEOUT = 600.0  # seconds, the whole download (docs/api.md §12.3)
MAX_ATTEMPTS = 3
LEASE = 30.0  # seconds a claimed download stays this process's without a renewal
RENEW = LEASE / 3  # seconds between renewals while it runs
RESUME_EVERY = LEASE  # seconds between looks for downloads whose process went away
CHUNK_SIZE = 256 * 1024
SFTP_PORT = 22
SFTP_CONNECT_TIMEOUT = 60.0  # seconds, when the URL has no `timeout` query (docs/api.md §12.3)
MAX_REDIRECTS = 5  # followed by hand, each checked against the policy (docs/api.md §12.3)
REDIRECTS = (301, 302, 303, 307, 308)


class Resolver(outbound.Resolver, AbstractResolver):
    """The policy's resolver as aiohttp's type: only allowed addresses are connected to."""


class DownloadFailed(Exception):
    """A download that ended without content; str() is the error recorded for it."""


class Downloads:
    """The downloads running in this process, one task per image."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: BlobStore,
        cipher: Cipher,
        max_size: int,
        session: aiohttp.ClientSession,
        api_url: str,
        policy: outbound.Policy,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.api_url = api_url  # for webhook payloads
        self.store = store
        self.cipher = cipher
        self.max_size = max_size
        self.session = session
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, image_id: int) -> None:
        """Run the image's pending download in the background (once per image)."""
        if image_id in self._tasks:
            return
        task = asyncio.create_task(self._run(image_id), name=f"image-download-{image_id}")
        self._tasks[image_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(image_id, None))

    def cancel(self, image_id: int) -> None:
        """Stop the image's download, if it runs here (the image was deleted)."""
        task = self._tasks.get(image_id)
        if task is not None:
            task.cancel()

    async def join(self) -> None:
        """Wait until no download runs."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def close(self) -> None:
        """Cancel every download; each stays pending, its lease given up, and is started again
        by the next process that looks."""
        for task in self._tasks.values():
            task.cancel()
        await self.join()

    async def resume(self) -> None:
        """Start the pending downloads no process holds (a previous run's, or those of a
        process that died); fail those tried too often."""
        async with self.pool.acquire() as conn:
            pending = await images.pending_downloads(conn)
        for image_id, attempts in pending:
            if attempts >= MAX_ATTEMPTS:
                await self._finish(image_id, None, images.INTERRUPTED)
            else:
                log.info("image %d download resumed", image_id)
                self.start(image_id)

    async def resume_forever(self, outage: db.Outage) -> None:
        """Resume every RESUME_EVERY seconds until cancelled; a database outage is logged once
        (`outage`) and the next look tries again."""
        while True:
            await asyncio.sleep(RESUME_EVERY)
            await self.try_resume(outage)

    async def try_resume(self, outage: db.Outage) -> None:
        """`resume`, noting a database outage in `outage` instead of raising it."""
        try:
            await self.resume()
        except db.OUTAGE as exc:
            outage.failed(exc)
        else:
            outage.worked()

    async def _run(self, image_id: int) -> None:
        try:
            async with self.pool.acquire() as conn:
                secret = await images.claim_download(conn, image_id, LEASE)
            if secret is None:  # deleted, finished, or running in another process
                return
            renewing = asyncio.create_task(self._renew(image_id))
            try:
                blob, error = await self._download(image_id, secret), None
            except DownloadFailed as exc:
                blob, error = None, str(exc)
            except asyncio.CancelledError:  # shutting down: the next start need not wait
                await self._release(image_id)
                raise
            finally:
                renewing.cancel()
            await self._finish(image_id, blob, error)
        except db.OUTAGE as exc:
            # Left pending (its lease runs out): a look after the database's return resumes it.
            log.warning("image %d download left pending: %s", image_id, db.reason(exc))
        except Exception:
            log.exception("image %d download crashed", image_id)
            await self._give_up(image_id)

    async def _renew(self, image_id: int) -> None:
        """Keep the download's lease while it runs; a failed renewal is tried again, and an
        outage logged once."""
        outage = db.Outage(f"image {image_id}: renewing the download's lease", log)
        while True:
            await asyncio.sleep(RENEW)
            try:
                async with self.pool.acquire() as conn:
                    await images.renew_download(conn, image_id, LEASE)
            except db.OUTAGE as exc:
                outage.failed(exc)
            else:
                outage.worked()

    async def _release(self, image_id: int) -> None:
        try:
            async with self.pool.acquire() as conn:
                await images.renew_download(conn, image_id, 0.0)
        except db.OUTAGE:
            pass  # the lease runs out by itself

    async def _give_up(self, image_id: int) -> None:
        try:
            await self._finish(image_id, None, "download failed: internal error")
        except Exception:  # e.g. the database is away: left pending, tried again next start
            log.exception("image %d download left pending", image_id)

    async def _download(self, image_id: int, secret: bytes) -> Blob:
        """The downloaded content, stored; raises DownloadFailed with the error to record."""
        try:
            url = images.open_url(self.cipher, image_id, secret)
            async with asyncio.timeout(TIMEOUT):
                return await self._fetch(url)
        except DecryptionError:
            raise DownloadFailed("download URL could not be decrypted") from None
        except images.NotQcow2:
            raise DownloadFailed(images.NOT_QCOW2) from None
        except BlobTooLarge as exc:
            raise DownloadFailed(
                f"file too large, cannot exceed {size_text(exc.max_size)}"
            ) from None
        except TimeoutError:
            raise DownloadFailed(f"download timed out after {TIMEOUT:g} seconds") from None
        except outbound.Refused as exc:  # nothing was sent: nothing of the remote to tell
            raise DownloadFailed(f"download failed: {exc}") from None
        except aiohttp.InvalidURL as exc:  # its text is the URL, without the user info
            raise DownloadFailed(f"download failed: invalid URL {exc}") from None
        # The SSH or SFTP server's reason (the password is never sent back).
        except asyncssh.Error as exc:
            raise DownloadFailed(f"download failed: {exc.reason or type(exc).__name__}") from None
        # ValueError: a URL or credentials aiohttp or asyncssh refuses. No message holds the
        # password: aiohttp never sees it in a URL (see _fetch_http), asyncssh never shows it.
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DownloadFailed(f"download failed: {str(exc) or type(exc).__name__}") from None

    async def _fetch(self, url: str) -> Blob:
        parts = urlsplit(url)
        if parts.scheme.lower() == "sftp":
            return await self._fetch_sftp(parts)
        return await self._fetch_http(parts)

    async def _fetch_http(self, parts: SplitResult) -> Blob:
        """GET the URL, following up to MAX_REDIRECTS redirects by hand: each URL's host is
        checked before its request (aiohttp connects to a literal address without asking the
        session's Resolver, which checks names)."""
        headers = {}
        if parts.username is not None:  # user info is sent as Basic auth, not in the URL
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        target = URL(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
        origin = None
        for _ in range(MAX_REDIRECTS + 1):
            checked = URL(self.policy.checked_url(str(target)), encoded=True)
            origin = origin or checked.origin()
            if checked.origin() != origin:  # credentials stay with their own server
                headers.pop("Authorization", None)
            async with self.session.get(
                checked, headers=headers, allow_redirects=False
            ) as response:
                location = response.headers.get("Location")
                if response.status in REDIRECTS and location:
                    target = _redirect(response.url, location)
                    continue
                if not 200 <= response.status < 300:
                    status = f"{response.status} {response.reason or ''}".strip()
                    raise DownloadFailed(f"download failed: unexpected status {status}")
                chunks = images.qcow2_only(response.content.iter_chunked(CHUNK_SIZE))
                return await self.store.put(chunks, self.max_size)
        raise DownloadFailed(f"download failed: more than {MAX_REDIRECTS} redirects")

    async def _fetch_sftp(self, parts: SplitResult) -> Blob:
        """Password login to host[:port], then the file at the URL path (docs/api.md §12.3)."""
        path = unquote(parts.path)
        conn = await _sftp_connect(parts, self.policy)
        try:
            sftp = await conn.start_sftp_client()
            try:
                file = await sftp.open(path, "rb")
            except asyncssh.SFTPNoSuchFile:
                raise DownloadFailed(f"download failed: no such file {path}") from None
            chunks = images.qcow2_only(_sftp_chunks(file))
            return await self.store.put(chunks, self.max_size)
        finally:
            # Closing the connection ends its SFTP session and file. Not awaited: a close that
            # fails or is cancelled after `put` must not lose the stored blob.
            conn.close()

    async def _announce(self, conn: asyncpg.Connection, image_id: int) -> None:
        image = await images.get(conn, image_id)
        assert image is not None

        async def payload() -> dict[str, object]:
            [body] = await images.to_json(conn, [image], self.api_url)
            return {"action": "downloaded", "image": body}

        await webhooks.emit(conn, image.namespace_id, "images", payload)

    async def _finish(self, image_id: int, blob: Blob | None, error: str | None) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                kept = await images.finish_download(conn, image_id, blob, error)
                if kept:
                    await self._announce(conn, image_id)
        except BaseException:
            if blob is not None:
                await self.store.delete(blob.key)
            raise
        if blob is not None and not kept:  # the image was deleted meanwhile
            await self.store.delete(blob.key)
        if error is None:
            log.info("image %d downloaded", image_id)
        else:
            log.warning("image %d download failed: %s", image_id, error)


def _redirect(current: URL, location: str) -> URL:
    """The URL a redirect's Location points to, from `current`; raises DownloadFailed."""
    try:
        target = current.join(URL(location))
    except ValueError:
        raise DownloadFailed("download failed: invalid redirect location") from None
    if target.scheme not in ("http", "https"):
        raise DownloadFailed("download failed: redirect to a URL that is not http or https")
    return target


async def _sftp_connect(
    parts: SplitResult, policy: outbound.Policy
) -> asyncssh.SSHClientConnection:
    """A logged-in SSH connection to the sftp URL's host, at an address the policy allows;
    raises DownloadFailed or outbound.Refused."""
    if not parts.hostname:
        raise DownloadFailed("download failed: no host in URL")
    timeout = _connect_timeout(parts.query)
    port = parts.port or SFTP_PORT
    # Resolved and checked first, then connected to by address: nothing is resolved again
    # between the check and the connection.
    address, *_ = await policy.addresses(parts.hostname, port)
    try:
        return await asyncssh.connect(
            address,
            port,
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
            # The URL carries no host key to check the server against, so none is checked.
            known_hosts=None,
            preferred_auth="password",
            # Nothing of this server's own: no keys, agent or ~/.ssh/config (a ProxyCommand).
            client_keys=None,
            agent_path=None,
            config=None,
            connect_timeout=timeout,  # covers the handshake and login too
        )
    except TimeoutError:
        raise DownloadFailed(
            f"download failed: connect timed out after {timeout:g} seconds"
        ) from None
    except asyncssh.PermissionDenied:
        raise DownloadFailed("download failed: authentication failed") from None


def _connect_timeout(query: str) -> float:
    """Seconds from the sftp URL's `timeout` query (a duration like `30s`), else the default."""
    text = parse_qs(query).get("timeout", [""])[0]
    if not text:
        return SFTP_CONNECT_TIMEOUT
    try:
        return parse_duration(text)
    except ValueError:
        raise DownloadFailed(f"download failed: invalid timeout {text}") from None


async def _sftp_chunks(file: asyncssh.SFTPClientFile) -> AsyncIterator[bytes]:
    while chunk := await file.read(CHUNK_SIZE):
        yield cast(bytes, chunk)  # opened "rb": bytes, whatever read()'s AnyStr says


DOWNLOADS = web.AppKey("image_downloads", Downloads)


async def context(app: web.Application) -> AsyncIterator[None]:
    """A cleanup_ctx for the app: runs downloads while it serves, resuming pending ones at
    start-up; registered after the pool and blob store, so it stops before them."""
    config = app[CONFIG]
    policy = outbound.Policy.from_config(config)
    timeout = aiohttp.ClientTimeout(total=None)  # the whole download is bounded by TIMEOUT
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=Resolver(policy)),
        # No cookies kept from one user's download to another's.
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=timeout,
    ) as session:
        downloads = Downloads(
            app[POOL],
            app[BLOBS],
            app[CIPHER],
            config.images.max_size,
            session,
            config.server.api_url,
            policy,
        )
        app[DOWNLOADS] = downloads
        # The database may be away at start-up: the API serves meanwhile (503) and a later
        # look starts what is pending.
        outage = db.Outage("looking for pending image downloads", log)
        await downloads.try_resume(outage)
        resuming = asyncio.create_task(downloads.resume_forever(outage))
        try:
            yield
        finally:
            resuming.cancel()
            await downloads.close()
