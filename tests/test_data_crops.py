"""Crop-size list and best-fit crop (spec §6.5, original imgproc.py rule)."""

import numpy as np
import pytest
from PIL import Image

from lumina_jax.data import crops


def staircase_table(resolution: int, patch: int = 16, max_ratio: float = 4.0):
    """Closed form of the original staircase walk, derived independently of the loop.

    With N patches, width w (in patches) is visited with heights from N // (w + 1) (the height
    reached at width w + 1; at least 1) up to N // w, widths from N down to 1, heights ascending.
    """
    n = (resolution // patch) ** 2
    table = []
    for w in range(n, 0, -1):
        for h in range(max(1, n // (w + 1)), n // w + 1):
            if max(w, h) <= max_ratio * min(w, h):
                table.append((w * patch, h * patch))
    return table


@pytest.mark.parametrize("resolution", [256, 1024])
def test_crop_sizes_match_independent_table(resolution):
    got = list(crops.crop_sizes_for_resolution(resolution))
    assert got == staircase_table(resolution)
    for w, h in got:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= resolution**2
        assert max(w, h) / min(w, h) <= 4.0
    # Sizes hug the area budget (what keeps mixed-mode padding small): >= 96.5 % of the token
    # budget at 1024, >= 87.5 % at 256.
    n = (resolution // 16) ** 2
    fill = min((w // 16) * (h // 16) for w, h in got) / n
    assert fill >= {256: 0.875, 1024: 0.965}[resolution]


def test_1024_list_contents_and_count():
    sizes = crops.crop_sizes_for_resolution(1024)
    for s in [(1024, 1024), (1152, 896), (1344, 768), (2048, 512), (512, 2048), (896, 1152)]:
        assert s in sizes
    assert sizes[0] == (2048, 512) and sizes[-1] == (512, 2048)
    # The original rule (4096 patches of 16 px) gives 193 sizes; spec §6.5 says 51, which does not
    # follow from the code it cites (51 is the subset with both sides' (side // 32) even).
    assert len(sizes) == 193
    assert len(crops.crop_sizes_for_resolution(256)) == 49
    assert len(set(sizes)) == len(sizes)


def test_generate_crop_size_list_small_case_by_hand():
    # 4 patches of 16 px: walk (4,1) (3,1) (2,1) (2,2) (1,2) (1,3) (1,4); ratio <= 4 keeps all.
    assert crops.generate_crop_size_list(4, 16) == [
        (64, 16), (48, 16), (32, 16), (32, 32), (16, 32), (16, 48), (16, 64)
    ]
    assert crops.generate_crop_size_list(4, 16, max_ratio=2.0) == [(32, 16), (32, 32), (16, 32)]
    with pytest.raises(ValueError):
        crops.generate_crop_size_list(4, 16, max_ratio=0.5)


def original_style_best(w, h, sizes):
    """The original's expression: sort (score, size) descending, take the first."""
    rem = [min(cw / w, ch / h) / max(cw / w, ch / h) for cw, ch in sizes]
    return sorted(zip(rem, sizes), reverse=True)[0][1]


def test_best_crop_size_matches_original_ranking():
    sizes = crops.crop_sizes_for_resolution(1024)
    rng = np.random.default_rng(0)
    dims = [(1024, 1024), (4000, 3000), (3000, 4000), (1920, 1080), (500, 5000), (5000, 500),
            (1, 1), (17, 3)] + [tuple(int(x) for x in rng.integers(1, 6000, 2)) for _ in range(300)]
    for w, h in dims:
        assert crops.best_crop_size(w, h, sizes) == original_style_best(w, h, sizes), (w, h)


def test_best_crop_size_exact_aspect_and_extremes():
    sizes = crops.crop_sizes_for_resolution(1024)
    assert crops.best_crop_size(1344 * 3, 768 * 3, sizes) == (1344, 768)
    assert crops.best_crop_size(1152, 896, sizes) == (1152, 896)
    assert crops.best_crop_size(10_000, 100, sizes) == (2048, 512)  # beyond 4:1 -> the widest
    assert crops.best_crop_size(100, 10_000, sizes) == (512, 2048)


@pytest.mark.parametrize("src", [(300, 200), (97, 23), (23, 97), (64, 64), (2000, 1000), (129, 301)])
def test_resize_and_crop_output_size_and_centering(src):
    sizes = crops.crop_sizes_for_resolution(64)
    w, h = src
    # Left half black, right half white: a centred crop keeps the boundary in the middle column.
    arr = np.zeros((h, w), np.uint8)
    arr[:, w // 2:] = 255
    image = Image.fromarray(arr, "L")
    out = crops.var_center_crop(image, sizes)
    assert out.size == crops.best_crop_size(w, h, sizes)
    row = np.asarray(out, np.float32)[out.size[1] // 2]
    left, right = row[: out.size[0] // 4].mean(), row[-(out.size[0] // 4):].mean()
    assert left < 64 and right > 192


def test_random_offset_is_deterministic_and_stays_inside():
    # a horizontal ramp: a crop's mean tells where along the (resized, 256 px wide) image it was taken
    ramp = np.broadcast_to(np.linspace(0, 255, 400, dtype=np.float32)[None, :], (100, 400)).astype(np.uint8)
    image = Image.fromarray(ramp, "L")
    a = crops.resize_and_crop(image, (64, 64), np.random.default_rng(3))
    b = crops.resize_and_crop(image, (64, 64), np.random.default_rng(3))
    assert a.size == b.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    centre = np.asarray(crops.resize_and_crop(image, (64, 64)), np.float32).mean()
    means = [np.asarray(crops.resize_and_crop(image, (64, 64), np.random.default_rng(s)), np.float32).mean()
             for s in range(24)]  # fmt: skip
    assert abs(centre - 127.5) < 2
    assert min(means) < centre - 20 and max(means) > centre + 20  # offsets spread over both sides of the centre
    assert min(means) >= 255 * 32 / 256 - 2 and max(means) <= 255 * (1 - 32 / 256) + 2  # never outside the image


def test_ties_go_to_the_larger_size_whatever_the_list_order():
    # A 2:1 image scores 0.5 (exactly, in floats) against both 1:1 and 4:1; the original sorts
    # (score, size) tuples in descending order, so the larger (width, height) wins.
    for sizes in ([(32, 32), (128, 32)], [(128, 32), (32, 32)]):
        assert crops.best_crop_size(200, 100, sizes) == original_style_best(200, 100, sizes) == (128, 32)
    for sizes in ([(32, 32), (32, 128)], [(32, 128), (32, 32)]):
        assert crops.best_crop_size(100, 200, sizes) == (32, 128)


@pytest.mark.parametrize("src", [(2000, 100), (100, 2000), (1000, 300)])
def test_crop_is_centred_on_extreme_aspect_ratios(src):
    # Beyond 4:1 most of the long side is cut away; a linear ramp along it must keep its middle.
    w, h = src
    ramp = np.linspace(0, 255, max(w, h), dtype=np.float32)
    arr = np.broadcast_to(ramp[None, :], (h, w)) if w > h else np.broadcast_to(ramp[:, None], (h, w))
    out = crops.var_center_crop(Image.fromarray(arr.astype(np.uint8), "L"), crops.crop_sizes_for_resolution(64))
    assert abs(np.asarray(out, np.float32).mean() - 127.5) < 3


@pytest.mark.parametrize("resolution", [64, 256, 1024])
def test_crop_fitter_gives_best_crop_size_everywhere(resolution):
    """The bisection fitter (global plan of raw images) answers exactly as the linear scan, ties included."""
    sizes = crops.crop_sizes_for_resolution(resolution)
    fit = crops.CropFitter(sizes)
    rng = np.random.default_rng(resolution)
    dims = [tuple(int(x) for x in rng.integers(1, 6000, 2)) for _ in range(3000)]
    dims += [(cw * k, ch * k) for cw, ch in sizes for k in (1, 3)]  # exact aspect ratios
    dims += [(200, 100), (100, 200), (1, 1), (10_000, 1), (1, 10_000), (4000, 3000), (1920, 1080)]
    for w, h in dims:
        assert fit(w, h) == crops.best_crop_size(w, h, sizes), (w, h)
    tie = crops.CropFitter([(32, 32), (128, 32)])  # 2:1 scores 0.5 against both: the larger wins
    assert tie(200, 100) == (128, 32)
    with pytest.raises(ValueError, match="positive"):
        fit(0, 5)


def test_thin_images_resize_only_the_kept_region():
    """A strip far beyond 4:1 would be resized whole to cover the crop (2 x 3000 at 1024 px: 512 x
    768000 pixels, GBs); only the region that lands in the crop is resized, with the same geometry."""
    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 255, (3000, 2, 3), np.uint8), "RGB")  # 2 wide, 3000 high
    out = crops.resize_and_crop(strip, (512, 2048), np.random.default_rng(1))
    assert out.size == (512, 2048)
    # a moderately thin image through both paths (threshold forced): the same crop, up to the filter's edge
    image = Image.fromarray((np.add.outer(np.arange(60), np.arange(400)) % 256).astype(np.uint8), "L")
    full = np.asarray(crops.resize_and_crop(image, (64, 32), np.random.default_rng(2)), np.float32)
    old, crops.THIN_FACTOR = crops.THIN_FACTOR, 0
    try:
        boxed = np.asarray(crops.resize_and_crop(image, (64, 32), np.random.default_rng(2)), np.float32)
    finally:
        crops.THIN_FACTOR = old
    assert full.shape == boxed.shape and np.abs(full - boxed)[2:-2, 2:-2].max() <= 2.0
