"""Prepare stage: fetch + decode (images, videos) or fetch + mesh render + voxelise (3D), in one call on one node.

Bytes never cross operators as a path: each row's file is fetched into this worker's scratch folder (or read in
place when local, or found in the fetch cache), decoded at once, and the scratch copy deleted. Several downloads
are in flight per worker while earlier rows decode. Videos (and any modality in `decode.isolate`) decode in a
killable child process with a wall-clock limit. A worker holds one HTTP client, one decode child and, for 3D, one
renderer (one CUDA context) for its lifetime; the 3D branch may declare a GPU share.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

from pipeline.decode import SAMPLE_FIELDS, DecodeConfig, DecodeError, DecodeSkip, decode_file, resize_placement
from pipeline.faults import maybe_fault
from pipeline.fetch import FetchConfig, FetchError, Fetcher
from pipeline.isolate import IsolateError, Isolator
from pipeline.mesh.config import MeshConfig
from pipeline.rows import Row, describe, fail, skip, window_id
from pipeline.stage import Resources, Stage
from pipeline.storage import StorageOptions

DECODED = SAMPLE_FIELDS  # pixels, fps, num_frames, sizes, the tokenized window (pipeline/decode.py)
VOXELIZED = ("voxel_feats", "voxel_coords", "num_voxels", "render")


def scratch_root() -> str:
    """This node's scratch folder: PIPELINE_SCRATCH, else the temp dir (both node-local by default)."""
    return os.environ.get("PIPELINE_SCRATCH") or os.path.join(tempfile.gettempdir(), "atoken-scratch")


class Attempts:
    """Samples started on this node and not finished: one small file per sample id (ids are safe file names),
    holding how often it was started. A worker killed while on a sample (out of memory, a crash) leaves its
    file behind; when Ray retries the batch, a sample started `limit` times already is failed instead, so one
    sample can never make a worker die forever, and the rest of its batch goes on."""

    def __init__(self, root: str, limit: int):
        self.root, self.limit = root, limit

    def start(self, sample_id: str) -> int:
        """Counts a start; returns how many earlier starts died (0 normally)."""
        path = os.path.join(self.root, sample_id)
        try:
            with open(path) as f:
                died = int(f.read() or 0)
        except (OSError, ValueError):
            died = 0
        tmp = f"{path}.{os.getpid()}"
        for _ in range(8):  # another worker's close() may remove the (empty) folders between makedirs and open,
            try:  # or the parent while makedirs creates the leaf
                os.makedirs(self.root, exist_ok=True)
                with open(tmp, "w") as f:
                    f.write(str(died + 1))
                os.replace(tmp, path)
                break
            except FileNotFoundError:
                continue
        return died

    def exhausted(self, died: int) -> bool:
        return died >= self.limit

    def finish(self, sample_id: str) -> None:
        try:
            os.unlink(os.path.join(self.root, sample_id))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Removes the folders when no sample is left in them (a killed sample's file stays). Once per batch, not
        per sample: creating and removing the folders for every image cost ~4 ms a row on an overlay filesystem."""
        for d in (self.root, os.path.dirname(self.root)):
            try:
                os.rmdir(d)
            except OSError:
                break


def _attempted_decode(attempts: Attempts, sample_id: str, *args) -> tuple[dict, float]:
    """decode_file(*args) in the decode child, between the sample's attempt start and finish: ({"exhausted":
    deaths}, 0) for a sample whose worker died too often on it, else (decoded fields, seconds)."""
    died = attempts.start(sample_id)
    if attempts.exhausted(died):
        return {"exhausted": died}, 0.0
    t0 = time.perf_counter()
    try:
        return decode_file(*args), time.perf_counter() - t0
    finally:
        attempts.finish(sample_id)


class Prepare(Stage):
    reads = ("id", "modality", "uri", "span_start", "span_end")
    adds = DECODED + VOXELIZED

    def __init__(
        self,
        fetch: FetchConfig,
        decode: DecodeConfig,
        mesh: MeshConfig,
        storage: StorageOptions | None = None,
        branch: str = "media",
        gpus: float = 0.0,
        cpus: float = 1.0,
        batch_size: int = 8,
        run_id: str = "local",
        keep_mesh: bool = False,
    ):
        self.keep_mesh = keep_mesh  # QA: 3D rows also carry the loaded mesh ("mesh", a MeshData) to render it
        self.fetch_cfg, self.decode_cfg, self.mesh_cfg, self.run_id = fetch, decode, mesh, run_id
        self.storage, self.branch, self.gpus, self.cpus, self.batch_size = storage, branch, gpus, cpus, batch_size
        self.name = "decode" if branch == "media" else "mesh"
        self.fetcher = self.isolator = self.mesh = self.attempts = None

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus, gpus=self.gpus)

    def setup(self) -> None:
        scratch = os.path.join(scratch_root(), f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(scratch, exist_ok=True)
        self.scratch = scratch  # this worker's own folder: removed by teardown()
        self.fetcher = Fetcher(self.fetch_cfg, scratch, self.storage)
        self.isolator = Isolator()
        self.attempts = Attempts(os.path.join(scratch_root(), "attempts", self.run_id), self.decode_cfg.max_attempts)
        if self.branch == "media":  # the speed path, once per worker
            print(f"decode: {resize_placement(self.decode_cfg)}", flush=True)

    def teardown(self) -> None:
        for part in (self.fetcher, self.isolator, getattr(self, "attempts", None)):
            if part is not None:
                part.close()
        self.fetcher = self.isolator = self.mesh = self.attempts = None
        if getattr(self, "scratch", None):  # the Fetcher removes its own sub-folder, not this one
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
        self._ready = False

    def __del__(self):
        try:
            self.teardown()
        except Exception:
            pass

    def process_batch(self, rows: list[Row]) -> list[Row]:
        maybe_fault("fetch")
        out: list[Row | None] = [None] * len(rows)
        by_file: dict[tuple[str, str], list[int]] = {}  # the clips of one video are fetched once
        for i, r in enumerate(rows):
            by_file.setdefault((r.get("uri") or "", r.get("modality", "")), []).append(i)
        try:
            self._prepare_files(rows, by_file, out)
        finally:
            self.attempts.close()
        return out

    def _prepare_files(self, rows: list[Row], by_file: dict, out: list) -> None:
        together, held = [], []  # images for the decode child, decoded in one round trip after the downloads
        try:
            self._fetch_and_prepare(rows, by_file, out, together, held)
            if together:
                self._decode_images(together, out)
        finally:
            for got in held:
                self.fetcher.release(got)

    def _fetch_and_prepare(self, rows: list[Row], by_file: dict, out: list, together: list, held: list) -> None:
        started = time.perf_counter()
        for key, got in self.fetcher.fetch_all([(k, k[0], k[1]) for k in by_file]):
            fetch_s = (time.perf_counter() - started) / len(by_file)  # downloads overlap: a share of the wait
            hold = False
            for i in by_file[key]:
                row = rows[i]
                if isinstance(got, FetchError):
                    out[i] = fail(row, "fetch", str(got))
                    continue
                if self._together(row):
                    together.append((i, row, got.path, fetch_s))
                    hold = True
                    continue
                t0 = time.perf_counter()
                died = self.attempts.start(row["id"])
                if self.attempts.exhausted(died):
                    out[i] = self._exhausted(row, died)
                else:
                    out[i] = self._one_file(row, got.path)  # a list when a clip gives several windows
                self.attempts.finish(row["id"])
                for r in out[i] if isinstance(out[i], list) else [out[i]]:
                    r["timings"] = {
                        **(row.get("timings") or {}),
                        "fetch": fetch_s,
                        self._stage_of(row): time.perf_counter() - t0,
                    }
            if hold:
                held.append(got)
            elif not isinstance(got, FetchError):
                self.fetcher.release(got)
            started = time.perf_counter()

    def _together(self, row: Row) -> bool:
        """Images decoded in the child go there together: one round trip per batch, not per image."""
        cfg = self.decode_cfg
        return row.get("modality") == "image" and "image" in cfg.isolate and cfg.timeout_s > 0

    def _decode_images(self, items: list[tuple], out: list) -> None:
        """Decodes (index, row, path, fetch_s) images in the child in one task (`Isolator.run_many`): each under
        the per-sample limits, a hang, crash or out-of-memory failing only its image. The attempt bookkeeping
        runs in the child, around each image (`_attempted_decode`), so a worker killed mid-batch counts a death
        against the image it was on only. Each row's decode time: its own, plus a share of the round trip."""
        cfg = self.decode_cfg
        t0 = time.perf_counter()
        calls = [(self.attempts, row["id"], path, "image", cfg) for _, row, path, _ in items]
        got = self.isolator.run_many(
            _attempted_decode, calls, timeout_s=cfg.timeout_s, label="decode", memory_bytes=cfg.memory_mb << 20
        )
        own = [value[1] if status == "ok" else 0.0 for status, value in got]
        share = max(0.0, time.perf_counter() - t0 - sum(own)) / len(items)
        for (i, row, _, fetch_s), (status, value), sec in zip(items, got, own):
            self.attempts.finish(row["id"])  # (the child's finish may not have run: it crashed or hung)
            if status != "ok":
                done = self._decode_failure(row, value)
            elif "exhausted" in value[0]:
                done = self._exhausted(row, value[0]["exhausted"])
            else:
                done = self._decoded(row, value[0])
            for r in done if isinstance(done, list) else [done]:
                r["timings"] = {**(row.get("timings") or {}), "fetch": fetch_s, "decode": sec + share}
            out[i] = done

    def _exhausted(self, row: Row, died: int) -> Row:
        return fail(
            row,
            self._stage_of(row),
            f"its worker died {died} times while preparing it (killed for memory?); not tried again",
        )

    def _stage_of(self, row: Row) -> str:
        return "mesh" if row.get("modality") == "3d" else "decode"

    def _one_file(self, row: Row, path: str) -> Row:
        if row.get("modality") == "3d":
            return self._mesh(row, path)
        if row.get("modality") not in ("image", "video"):
            return fail(row, "decode", f"cannot prepare modality {row.get('modality')!r}")
        span = (row["span_start"], row["span_end"]) if row.get("span_start") is not None else None
        cfg = self.decode_cfg
        timeout = cfg.timeout_s if row["modality"] in cfg.isolate else 0
        try:
            got = self.isolator.run(
                decode_file,
                path,
                row["modality"],
                cfg,
                span,
                timeout_s=timeout,
                label="decode",
                memory_bytes=cfg.memory_mb << 20,
            )
        except Exception as exc:
            return self._decode_failure(row, exc)
        return self._decoded(row, got)

    def _decode_failure(self, row: Row, exc: BaseException) -> Row:
        if isinstance(exc, DecodeSkip):  # a job rule (filter, no upscaling): skipped, with the rule
            return skip(row, "decode", str(exc))
        if isinstance(exc, (IsolateError, DecodeError)):
            return fail(row, "decode", str(exc))
        return fail(row, "decode", describe(exc))  # any decoder error is this sample's, never the worker's

    def _decoded(self, row: Row, got: dict) -> Row | list[Row]:
        first = {**row, **{k: got.get(k) for k in DECODED}}
        if not got.get("more_windows"):
            return first
        return [first] + [
            {**first, **{k: w.get(k) for k in DECODED}, "id": window_id(row["id"], w["window_index"])}
            for w in got["more_windows"]
        ]

    def _mesh(self, row: Row, path: str) -> Row:
        import torch

        from pipeline.mesh.load import MeshError
        from pipeline.mesh.stage import MeshStage, load_isolated

        if self.mesh is None:  # the renderer (and its CUDA context) lives as long as this worker
            self.mesh = MeshStage(self.mesh_cfg)
            print(f"mesh: {self.mesh.describe()}", flush=True)
        if self.branch != "3d":  # a mesh in the media pool (no GPU share: one pool for all); the 3D pool's
            maybe_fault("mesh")  # calls pass the stage-level "mesh" point (Stage.__call__) already
        try:  # loading (trimesh, CPU) in the killable child; render + voxels + features in this worker
            mesh = load_isolated(self.isolator, path, self.mesh_cfg)
            got = self.mesh.process(path, str(row["id"]), mesh)
        except IsolateError as exc:
            return fail(row, "mesh", str(exc))
        except MeshError as exc:
            return fail(row, "mesh", str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            return fail(row, "mesh", f"out of GPU memory while rendering/voxelising: {exc}")
        except Exception as exc:
            return fail(row, "mesh", describe(exc))
        return {**row, **got, **({"mesh": mesh} if self.keep_mesh else {})}
