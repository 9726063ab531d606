"""File type sniffing by magic bytes (and extension for the formats that have none: OBJ, binary STL).

Containers that decord may not open (MPEG-TS, FLV, Ogg) are recognised as video by their bytes; the decode stage
opens them with PyAV when decord cannot. Content that no rule recognises, in a file whose extension names a
video container, is probed with PyAV (`probe_video`) before it is rejected."""

from __future__ import annotations

from pathlib import Path

HEAD_BYTES = 512  # MPEG-TS is recognised by its sync byte every 188 bytes

# format -> modality
MODALITY = {
    "jpeg": "image",
    "png": "image",
    "gif": "image",
    "webp": "image",
    "tiff": "image",
    "bmp": "image",
    "pnm": "image",
    "avif": "image",
    "heic": "image",
    "mp4": "video",
    "mov": "video",
    "mkv": "video",
    "avi": "video",
    "mpegts": "video",
    "flv": "video",
    "ogg": "video",
    "mpeg": "video",
    "asf": "video",
    "glb": "3d",
    "ply": "3d",
    "stl": "3d",
    "obj": "3d",
    "gltf": "3d",
}
# extension -> format (used for naming, and for formats without magic bytes)
EXTENSIONS = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".jpe": "jpeg",
    ".png": "png",
    ".gif": "gif",
    ".webp": "webp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".bmp": "bmp",
    ".pgm": "pnm",
    ".ppm": "pnm",
    ".pbm": "pnm",
    ".pnm": "pnm",
    ".avif": "avif",
    ".heic": "heic",
    ".heif": "heic",
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".webm": "mkv",
    ".mkv": "mkv",
    ".avi": "avi",
    ".ts": "mpegts",
    ".mts": "mpegts",
    ".m2ts": "mpegts",
    ".flv": "flv",
    ".ogv": "ogg",
    ".ogg": "ogg",
    ".mpg": "mpeg",
    ".mpeg": "mpeg",
    ".vob": "mpeg",
    ".wmv": "asf",
    ".asf": "asf",
    ".3gp": "mp4",
    ".glb": "glb",
    ".ply": "ply",
    ".stl": "stl",
    ".obj": "obj",
    ".gltf": "gltf",
}
NO_MAGIC = {"obj", "stl", "gltf"}  # text/binary formats recognised by extension only
CANONICAL_EXT = {
    "jpeg": ".jpg",
    "png": ".png",
    "gif": ".gif",
    "webp": ".webp",
    "tiff": ".tiff",
    "bmp": ".bmp",
    "pnm": ".pnm",
    "avif": ".avif",
    "heic": ".heic",
    "mp4": ".mp4",
    "mov": ".mov",
    "mkv": ".mkv",
    "avi": ".avi",
    "mpegts": ".ts",
    "flv": ".flv",
    "ogg": ".ogv",
    "mpeg": ".mpg",
    "asf": ".wmv",
    "glb": ".glb",
    "ply": ".ply",
    "stl": ".stl",
    "obj": ".obj",
    "gltf": ".gltf",
}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_MOV_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def sniff_bytes(head: bytes) -> str | None:
    """Format name from the first bytes of a file, or None when not recognised."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 14:
        return "bmp"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return "avif"
        if brand in _HEIF_BRANDS:
            return "heic"
        return "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in _MOV_ATOMS:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "mkv"
    if head[:3] == b"FLV" and head[3:4] == b"\x01":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if _is_mpegts(head):
        return "mpegts"
    if head[:4] == b"glTF":
        return "glb"
    if head[:4] in (b"ply\n", b"ply\r"):
        return "ply"
    return None


def _is_mpegts(head: bytes) -> bool:
    """TS packets of 188 bytes (or 192 with a 4-byte timecode, M2TS) each start with the sync byte 0x47."""
    for first, step in ((0, 188), (4, 192)):
        marks = range(first, len(head), step)
        if len(marks) >= 2 and all(head[i] == 0x47 for i in marks):
            return True
    return False


PROBE_EXTENSIONS = {".ts", ".mts", ".m2ts", ".flv", ".ogv", ".ogg", ".mpg", ".mpeg", ".3gp", ".wmv", ".asf", ".vob"}


def probe_video(path: str | Path) -> str | None:
    """The container name when PyAV (FFmpeg) finds a decodable video stream in `path`, else None."""
    try:
        import av

        with av.open(str(path)) as c:
            v = c.streams.video
            return c.format.name if v and v[0].codec_context is not None else None
    except Exception:  # av.FFmpegError and friends: not a container FFmpeg can read
        return None


def read_head(path: str | Path, n: int = HEAD_BYTES) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def classify(path: str | Path, head: bytes | None = None) -> tuple[str | None, str | None, str]:
    """(format, modality, reason). Content wins over the extension; formats without magic bytes (OBJ, STL,
    glTF) fall back to the extension. format is None when the file is not recognised; reason says why."""
    head = read_head(path) if head is None else head
    ext = Path(path).suffix.lower()
    if not head:
        return None, None, "empty file (0 bytes)"
    fmt = sniff_bytes(head)
    if fmt is not None:
        return fmt, MODALITY[fmt], "magic bytes"
    by_ext = EXTENSIONS.get(ext)
    if by_ext in NO_MAGIC:
        return by_ext, MODALITY[by_ext], f"extension {ext}"
    if ext in PROBE_EXTENSIONS and Path(path).is_file() and (container := probe_video(path)):
        return EXTENSIONS[ext], "video", f"PyAV probe ({container})"
    what = f"a {by_ext} file" if by_ext else "a known type"
    return (
        None,
        None,
        f"unrecognised content: extension {ext or '(none)'} but magic bytes {head[:12].hex()} are not {what}",
    )


def check_modality(head: bytes, modality: str, ext: str = "", path: str | Path | None = None) -> str | None:
    """None when the bytes can be `modality`, else a readable reason. With `path`, unrecognised bytes in a
    file named like a video container are probed with PyAV first."""
    fmt = sniff_bytes(head)
    if fmt is not None and MODALITY[fmt] == modality:
        return None
    if (
        fmt is None
        and modality == "video"
        and path is not None
        and ext.lower() in PROBE_EXTENSIONS
        and probe_video(path)
    ):
        return None
    if fmt is None and modality == "3d" and EXTENSIONS.get(ext.lower()) in NO_MAGIC | {None}:
        return None  # OBJ/STL/glTF have no magic bytes; the mesh loader validates them
    got = f"looks like {fmt}" if fmt else f"magic bytes {head[:12].hex() or '(empty)'}"
    noun = {"image": "an image", "video": "a video", "3d": "a 3d mesh"}.get(modality, repr(modality))
    return f"content is not {noun} ({got})"
