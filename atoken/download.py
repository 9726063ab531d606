"""Download the released AToken checkpoints (the official `download_checkpoints.sh` list) into `checkpoints/`.

    python -m atoken.download                 # all five, resumable
    python -m atoken.download atoken-soc.pt   # one
    python -m atoken.download --dry-run       # what would be fetched, with sizes (HEAD only)

Each file streams to `<name>.part`; an interrupted download resumes with an HTTP Range request, and a server that
ignores the range restarts it. A file is kept only when its size equals the size the server announced; its
sha256 goes to `SHA256SUMS` beside it. The weights' licence (Apple ML Research Model Terms of Use) is saved as
`MODEL-LICENSE` next to them. `ATOKEN_CHECKPOINT_URL` / `--base-url` point at a mirror.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import httpx

BASE_URL = "https://ml-site.cdn-apple.com/models/atoken/"
LICENCE_URL = "https://raw.githubusercontent.com/apple/ml-atoken/main/MODEL-LICENSE"
FILES = {  # name -> what it is
    "atoken-soc.pt": "AToken-So/C, continuous (images, video, 3D)",
    "atoken-sod.pt": "AToken-So/D, discrete FSQ",
    "3d_decode_gs.pt": "3D Gaussian decoder",
    "atoken-soc-s1.pt": "AToken-So/C stage 1 (images)",
    "atoken-soc-s2.pt": "AToken-So/C stage 2 (images + video)",
}
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


def _url(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _total(resp: httpx.Response) -> int | None:
    """The whole file's size: from Content-Range on a 206, else Content-Length."""
    rng = resp.headers.get("content-range", "")
    if "/" in rng and rng.rsplit("/", 1)[1].isdigit():
        return int(rng.rsplit("/", 1)[1])
    n = resp.headers.get("content-length")
    return int(n) if n and n.isdigit() else None


def remote_size(client: httpx.Client, url: str) -> int | None:
    resp = client.head(url)
    if resp.status_code != 200:
        raise DownloadError(f"{url}: HTTP {resp.status_code}")
    return _total(resp)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download(client: httpx.Client, url: str, dest: Path, progress=None) -> tuple[str, int]:
    """Fetches `url` to `dest` (resuming `dest.part`). Returns (what happened, bytes in the file)."""
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        size = remote_size(client, url)
        if size is None or dest.stat().st_size == size:
            return "present", dest.stat().st_size
        dest.replace(part)  # a different size: treat as partial (resume, or restart if the server says so)
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 416 and have:  # nothing left to send: the part may be whole already
            total = remote_size(client, url)
        elif resp.status_code in (200, 206):
            total = _total(resp)
            if resp.status_code == 200:  # no range support (or no part): start from byte 0
                have = 0
            with open(part, "ab" if have else "wb") as f:
                for block in resp.iter_bytes():  # as received: a cut keeps what arrived
                    f.write(block)
                    if progress:
                        progress(len(block))
                f.flush()
                os.fsync(f.fileno())
        else:
            raise DownloadError(f"{url}: HTTP {resp.status_code}")
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"{url}: got {got} of {total} bytes; run again to resume")
    part.replace(dest)
    return ("resumed" if have else "downloaded"), got


def _record_sum(dest_dir: Path, name: str, digest: str) -> None:
    sums = dest_dir / "SHA256SUMS"
    lines = [l for l in (sums.read_text().splitlines() if sums.exists() else []) if not l.endswith(f"  {name}")]
    sums.write_text("\n".join(sorted(lines + [f"{digest}  {name}"])) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m atoken.download", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help=f"files to fetch (default: all of {', '.join(FILES)})")
    p.add_argument("--dest", type=Path, default=Path("checkpoints"))
    p.add_argument("--base-url", default=os.environ.get("ATOKEN_CHECKPOINT_URL", BASE_URL))
    p.add_argument("--licence-url", default=os.environ.get("ATOKEN_LICENCE_URL", LICENCE_URL))
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched (HEAD requests only)")
    p.add_argument("--timeout", type=float, default=60.0, help="connect/read timeout, seconds")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in FILES]
    if unknown:
        p.error(f"unknown checkpoint {', '.join(unknown)}; known: {', '.join(FILES)}")
    names = args.names or list(FILES)
    failed = 0
    with httpx.Client(timeout=args.timeout, follow_redirects=True) as client:
        if args.dry_run:
            for name in names:
                url = _url(args.base_url, name)
                try:
                    size = remote_size(client, url)
                    size_s = "size unknown" if size is None else f"{size / 1e6:.1f} MB"
                except (httpx.HTTPError, DownloadError) as exc:
                    size_s, failed = f"not reachable: {exc}", failed + 1
                state = "present" if (args.dest / name).exists() else "to fetch"
                print(f"{name}: {url} -> {args.dest / name} ({size_s}; {state})")
            return 1 if failed else 0
        args.dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            url, t0 = _url(args.base_url, name), time.perf_counter()
            try:
                what, size = download(client, url, args.dest / name)
            except (httpx.HTTPError, DownloadError, OSError) as exc:
                print(f"{name}: failed: {exc}", file=sys.stderr)
                failed += 1
                continue
            sums = args.dest / "SHA256SUMS"
            if what != "present" or not sums.exists() or f"  {name}\n" not in sums.read_text():
                _record_sum(args.dest, name, sha256_of(args.dest / name))
            print(f"{name}: {what}, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s ({FILES[name]})")
        try:
            what, _ = download(client, args.licence_url, args.dest / "MODEL-LICENSE")
            print(f"MODEL-LICENSE: {what} (the weights are for research use under these terms)")
        except (httpx.HTTPError, DownloadError, OSError) as exc:
            print(f"MODEL-LICENSE: failed: {exc}; read it at {LICENCE_URL}", file=sys.stderr)
            failed += 1
    if failed:
        print(f"{failed} failed; run the same command again to resume", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
