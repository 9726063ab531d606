"""QA pictures: labelled cards, video frames spread over the clip, 3D views of a real mesh, and the index page
opened in a real headless Chromium."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from pipeline.mesh.stage import MeshConfig, MeshStage
from pipeline.qa_pictures import (
    BAND,
    CELL,
    SampleScore,
    fit,
    grid,
    image_card,
    index_html,
    png_bytes,
    spread_frames,
    video_card,
    views_card,
)
from pipeline.storage import Storage
from tests.browser import PageParts, coloured_pixels, dump_dom, screenshot


def real_image(shared_data, name="astronaut.png", side=128) -> np.ndarray:
    with Image.open(shared_data / "images" / name) as im:
        im = im.convert("RGB").resize((side, side))
        return np.asarray(im, np.float32) / 255


def test_card_label_names_the_id_and_psnr_and_sits_in_the_band(shared_data):
    img = real_image(shared_data)
    rec = np.clip(img * 0.9, 0, 1)
    a = np.asarray(image_card(SampleScore("demo-image_00.jpg", "image", 31.25, 0.91), img, rec))
    b = np.asarray(image_card(SampleScore("demo-image_01.png", "image", 18.5, 0.42), img, rec))
    blank = np.asarray(image_card(SampleScore("", "image", None, None, error=" "), img, rec))
    assert a.shape == (BAND + 2 * CELL, CELL, 3)
    assert (a[BAND:] == b[BAND:]).all() and (a[BAND:] == blank[BAND:]).all()  # the pictures are the same
    assert (a[:BAND] != b[:BAND]).any()  # another id and PSNR: another label
    assert (a[:BAND] != blank[:BAND]).sum() > 200  # text drawn where the label goes
    assert SampleScore("x", "image", 31.25, 0.91).label() == "PSNR 31.25 dB  SSIM 0.910"
    assert SampleScore("x", "3d", 25.7).label() == "PSNR 25.70 dB (voxel features)"
    # input above reconstruction; the reconstruction cell is darker, as its picture
    assert a[BAND + CELL + 20 :].mean() < a[BAND + 20 : BAND + CELL].mean()


def test_long_ids_keep_their_end():
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    long_id = "objaverse-" + "0123456789abcdef" * 4 + "/chair.glb"
    got = fit(long_id, 150, draw)
    assert got.startswith("...") and got.endswith("chair.glb") and draw.textlength(got) <= 150
    assert fit("short", 150, draw) == "short"


def test_video_card_shows_four_frames_spread_over_a_fade_in():
    assert spread_frames(16) == [0, 5, 10, 15] and spread_frames(3) == [0, 1, 2] and spread_frames(4) == [0, 1, 2, 3]
    t = np.linspace(0, 1, 16, dtype=np.float32)[:, None, None, None]
    clip = t * np.ones((16, 64, 96, 3), np.float32) * np.array([1.0, 0.8, 0.6], np.float32)  # black -> bright
    picture = np.asarray(video_card(SampleScore("fade", "video", 30.0, 0.9), clip, clip * 0.95))
    assert picture.shape == (BAND + 2 * CELL, 4 * CELL, 3)
    # mean brightness of each frame cell's lower half (below the corner tag), input row and reconstruction row
    means = [
        [
            picture[BAND + r * CELL + CELL // 2 : BAND + (r + 1) * CELL, i * CELL : (i + 1) * CELL].mean()
            for i in range(4)
        ]
        for r in range(2)
    ]
    for row in means:
        assert row[0] < 1 and row[-1] > 40 and row == sorted(row)  # frame 0 black, later frames brighter
    assert means[1][-1] < means[0][-1]  # the reconstruction row is the darker clip


@pytest.fixture(scope="module")
def mesh_voxels(shared_data):
    """A real textured mesh through the 3D stage (CPU) and the embedded tiny tokenizer: (path, row, decoded features)."""
    from atoken.sparse import voxels_to_tokens
    from atoken.tokenizer import Tokenizer

    path = shared_data / "meshes" / "fuze.obj"
    row = MeshStage(MeshConfig(views=8, backend="cpu")).process(str(path), "fuze")
    feats, coords = voxels_to_tokens(row["voxel_feats"].astype(np.float32), row["voxel_coords"])
    _, rec = Tokenizer.from_files("tiny-c", device="cpu").reconstruct([(feats, coords)])
    decoded = ((rec[0][:, :768] + 1) / 2).clip(0, 1)
    return path, row, (coords[:, 1:].numpy(), decoded)


def silhouettes(views) -> list[np.ndarray]:
    return [np.asarray(v).max(-1) > 0.02 for v in views]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_3d_views_put_mesh_input_and_decoded_voxels_in_the_same_place(mesh_voxels):
    from pipeline.mesh.load import load_mesh
    from pipeline.qa_3d import ThreeDViews

    path, row, decoded = mesh_voxels
    views = ThreeDViews(MeshConfig(backend="cpu"), resolution=96)
    rows = views.rows("fuze", load_mesh(path), (row["voxel_coords"], row["voxel_feats"].astype(np.float32)), decoded)
    assert [name for name, _ in rows] == ["mesh", "input voxels", "decoded voxels"]
    assert all(len(v) == 4 and v[0].shape == (96, 96, 3) for _, v in rows)
    mesh, vin, vout = (silhouettes(v) for _, v in rows)
    for m, i, o in zip(mesh, vin, vout):
        assert 0.02 < m.mean() < 0.9  # the bottle is in view, not filling it
        assert iou(m, i) > 0.7 and iou(m, o) > 0.6  # same cameras, same unit cube
    assert iou(mesh[0], mesh[1]) < 0.98  # four different views
    ref, got = np.asarray(rows[0][1]), np.asarray(rows[1][1])
    both = np.stack(mesh) & np.stack(vin)
    assert np.abs(ref[both].mean(0) - got[both].mean(0)).max() < 0.15  # the voxels carry the mesh's colours
    card = np.asarray(views_card(SampleScore("fuze", "3d", 25.0), rows))
    assert card.shape == (BAND + 3 * CELL, 4 * CELL, 3) and card[BAND:].std() > 10


def test_3d_views_add_gaussian_splats_when_a_gs_checkpoint_is_configured(mesh_voxels, tmp_path):
    import yaml

    from atoken.gs_decoder import CONFIG_PATH, GaussianDecoder, GSDecoderConfig
    from pipeline.job import QAConfig
    from pipeline.mesh.load import load_mesh
    from pipeline.qa_3d import ThreeDViews

    cfg = yaml.safe_load(CONFIG_PATH.read_text())  # the official layout, shrunk: 1 block, 96 channels
    cfg["model"].update(num_blocks=1, model_channels=96, num_heads=2, num_head_channels=48, mlp_channels=192)
    cfg["model"]["representation_config"]["num_gaussians"] = 2  # (32 per voxel splat for minutes on a CPU)
    (tmp_path / "gs.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(0)
    torch.save(GaussianDecoder(GSDecoderConfig.from_dict(cfg)).state_dict(), tmp_path / "gs.pt")
    qa = QAConfig(gs_config=str(tmp_path / "gs.yaml"), gs_checkpoint=str(tmp_path / "gs.pt"))
    with pytest.raises(ValueError, match="not a file"):
        QAConfig(gs_checkpoint=str(tmp_path / "missing.pt"))

    path, row, decoded = mesh_voxels
    views = ThreeDViews(
        MeshConfig(backend="cpu"), resolution=64, gs_config=qa.gs_config, gs_checkpoint=qa.gs_checkpoint
    )
    rows = views.rows("fuze", load_mesh(path), (row["voxel_coords"], row["voxel_feats"].astype(np.float32)), decoded)
    assert [name for name, _ in rows][-1] == "GS splats"
    for m, s in zip(silhouettes(rows[0][1]), silhouettes(rows[-1][1])):
        near = np.asarray(Image.fromarray(m).filter(ImageFilter.MaxFilter(5)))  # the mesh, 2 px wider
        assert s.sum() > 0.3 * m.sum() and (s & ~near).sum() < 0.2 * s.sum()  # splats where the bottle is


def test_index_page_renders_in_headless_chromium(shared_data, tmp_path):
    """The page written through Storage, opened from disk by Chromium: the samples' ids and numbers are in the
    DOM, every <img> points at a written picture, and the screenshot shows the pictures' colours."""
    store = Storage(str(tmp_path / "store"))
    samples, cards = [], []
    for k, name in enumerate(["astronaut.png", "Channel_digital_image_CMYK_color.jpg"]):
        img = real_image(shared_data, name, side=160)
        s = SampleScore(f"demo-{name}", "image", 20.0 + k * 3.125, 0.5 + k / 10, picture=f"samples/image-{k:02d}.png")
        cards.append(image_card(s, img, np.clip(img * 0.8, 0, 1)))
        store.write_bytes(f"qa/{s.picture}", png_bytes(cards[-1]))
        samples.append(s)
    samples.append(SampleScore("demo-broken.mp4", "video", error="decode: no video stream"))
    store.write_bytes("qa/image.png", png_bytes(grid(cards, across=True)))
    results = {"image": {"n": 2, "psnr": 21.5625, "ssim": 0.55}, "video": {"n": 0}}
    store.write_bytes("qa/index.html", index_html(results, samples, {"image": "image.png"}, "test <store>").encode())
    page = tmp_path / "store" / "qa" / "index.html"

    dom = PageParts(dump_dom(page))
    assert dom.images == ["samples/image-00.png", "samples/image-01.png"]
    assert all((page.parent / src).is_file() for src in dom.images)
    assert [r[:4] for r in dom.rows] == [
        ["demo-astronaut.png", "image", "20.00", "0.500"],
        ["demo-Channel_digital_image_CMYK_color.jpg", "image", "23.12", "0.600"],
        ["demo-broken.mp4", "video", "", ""],
    ]
    assert dom.rows[2][4] == "decode: no video stream"

    shot = screenshot(page, tmp_path / "shot.png")
    with Image.open(shot) as im:
        assert im.size == (1280, 2000) and np.asarray(im.convert("L")).std() > 10
    seen = coloured_pixels(shot)
    in_cards = sum(coloured_pixels(c) for c in cards)
    assert seen > 0.8 * in_cards  # the pictures loaded and are shown at full size
    (page.parent / "samples" / "image-00.png").unlink()  # the check fails when a picture is missing
    assert coloured_pixels(screenshot(page, tmp_path / "shot2.png")) < seen - 0.5 * coloured_pixels(cards[0])
