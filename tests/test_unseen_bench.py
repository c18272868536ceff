"""bench/unseen.py's measures and its cheap training forms, against direct computations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import unseen
import unseen_protocols

from model.gsp import GeneralizedSumPooling, GlobalAveragePooling
from model.projection_init import principal_projection


def test_mean_pairwise_cosine_matches_the_pairs() -> None:
    points = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = F.normalize(points, dim=1)
    pairs = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    assert abs(unseen.mean_pairwise_cosine(points) - sum(pairs) / len(pairs)) < 1e-12


def test_effective_dimension_counts_equal_directions() -> None:
    generator = torch.Generator().manual_seed(1)
    flat = torch.zeros(20000, 16, dtype=torch.float64)
    flat[:, :4] = torch.randn(20000, 4, generator=generator, dtype=torch.float64)
    assert abs(unseen.effective_dimension(flat) - 4) < 0.1
    one = torch.randn(500, 1, generator=generator, dtype=torch.float64) * torch.ones(1, 16)
    assert abs(unseen.effective_dimension(one) - 1) < 1e-6


def test_object_masks_tile_the_map() -> None:
    positions = torch.arange(unseen_protocols.current().grid ** 2)
    masks = unseen.object_masks(positions, 6)
    assert torch.equal(masks.sum(dim=0), torch.ones(6, 6, dtype=torch.long))
    assert bool(masks[4, 2:4, 2:4].all()) and int(masks[4].sum()) == 4
    uniform = torch.ones(len(positions), 6, 6)
    assert abs(unseen.object_share(uniform, positions) - 1 / 9) < 1e-12


@pytest.mark.parametrize("trained_projection", [False, True])
def test_cheap_training_forms_equal_the_heads_on_raw_maps(trained_projection: bool) -> None:
    """GAP on pre-pooled maps equals GAP on the maps; the GSP head trained on projected maps
    equals :func:`unseen.full_head` (projection folded in) on the raw maps."""
    generator = torch.Generator().manual_seed(3)
    maps = torch.randn(6, 20, 6, 6, generator=generator)
    start = principal_projection(torch.randn(200, 20, generator=generator), 8, whiten=True)
    gap = GlobalAveragePooling(20, 8)
    pooled = maps.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(gap(maps).embedding, gap(pooled).embedding, atol=1e-5)

    inner = GeneralizedSumPooling(8, 8, num_prototypes=4, transport_ratio=0.3, entropy_weight=10)
    if not trained_projection:  # the recipe's frozen identity; else a trained (random) one
        with torch.no_grad():
            inner.projection.weight.copy_(torch.eye(8)[:, :, None, None])
            inner.projection.bias.zero_()
    inner.eval()
    full = unseen.full_head(inner, start)
    on_projected = inner(unseen.project(maps, *start))
    on_raw = full(maps)
    assert torch.allclose(on_projected.embedding, on_raw.embedding, atol=1e-4)
    assert torch.allclose(on_projected.weights, on_raw.weights, atol=1e-4)


def test_spherical_kmeans_finds_separated_directions() -> None:
    generator = torch.Generator().manual_seed(6)
    axes = torch.eye(4)
    points = torch.cat([axes[i] + 0.05 * torch.randn(50, 4, generator=generator) for i in range(4)])
    centres = unseen.spherical_kmeans(points, 4, generator)
    assert torch.allclose(centres.norm(dim=1), torch.ones(4), atol=1e-5)
    best = (centres @ axes.T).max(dim=0).values
    assert bool((best > 0.99).all())


def test_teacher_location_targets_peak_on_the_object() -> None:
    generator = torch.Generator().manual_seed(7)
    maps = torch.randn(3, 16, 6, 6, generator=generator)
    clean = torch.randn(3, 16, generator=generator)
    maps[:, :, 2, 3] = clean * 2
    targets = unseen.teacher_location_targets(maps, clean, 0.05)
    assert torch.allclose(targets.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    assert bool((targets.flatten(1).argmax(dim=1) == 2 * 6 + 3).all())


def test_gsp_variants_train() -> None:
    """Each new GSP option trains a few steps on a toy set without error and moves the head."""
    generator = torch.Generator().manual_seed(8)
    labels = torch.arange(8).repeat_interleave(4)
    maps = torch.randn(32, 20, 6, 6, generator=generator)
    start = principal_projection(maps.mean(dim=(2, 3)), 8, whiten=False)
    teacher = torch.randn(32, 20, generator=generator)
    inputs = unseen.Inputs(
        labels=labels,
        teacher=teacher,
        pooled=maps.mean(dim=(2, 3), keepdim=True),
        projected=unseen.project(maps, *start),
        location_targets=unseen.teacher_location_targets(maps, teacher, 0.1),
    )
    recipe = unseen.Recipe(
        **{
            **vars(unseen.recipe_of(unseen.parse_defaults())),
            "epochs": 2,
            "batch_instances": 4,
            "prototypes": 4,
            "lr_gsp_projection": 1e-2,
            "plan_teacher": 1.0,
            "prototype_init": "kmeans",
        }
    )
    head = unseen.train_head("GSP", recipe, inputs, start, 0)
    assert isinstance(head, GeneralizedSumPooling)
    assert not torch.allclose(head.projection.weight.flatten(1), torch.eye(8))
    assert torch.isfinite(unseen.pool(head, inputs.projected)[0]).all()


def test_the_tuning_loop_refuses_the_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import unseen_tune

    monkeypatch.setattr(sys, "argv", ["unseen_tune.py", "--split", "test"])
    with pytest.raises(SystemExit, match="validation split only"):
        unseen_tune.main()


def test_block_shuffle_keeps_the_blocks_and_moves_them() -> None:
    import numpy as np
    import unseen_data
    from PIL import Image

    pixels = np.arange(32 * 32 * 3, dtype=np.uint32).reshape(32, 32, 3) % 251
    photo = Image.fromarray(pixels.astype(np.uint8))
    shuffled = np.asarray(unseen_data.shuffle_blocks(photo, 8, np.random.default_rng(0)))

    def blocks(array: np.ndarray) -> list[bytes]:
        return sorted(
            array[r : r + 8, c : c + 8].tobytes() for r in range(0, 32, 8) for c in range(0, 32, 8)
        )

    assert blocks(shuffled) == blocks(np.asarray(photo))
    assert not np.array_equal(shuffled, np.asarray(photo))


def test_the_first_protocol_keeps_its_cache_name() -> None:
    """Its figures in docs/benchmarks.md were measured on the cache of this digest."""
    assert unseen_protocols.PROTOCOLS["objects"].digest() == "0bc711ab667f"
    assert unseen_protocols.PROTOCOLS["textures"].digest() != "0bc711ab667f"
    try:
        assert unseen_protocols.use("objects").map_size == 6
        assert unseen_protocols.current().clutter_classes == ("frog", "horse")
    finally:
        unseen_protocols.use(unseen_protocols.DEFAULT)
    assert unseen_protocols.current().map_size == 9


def test_textures_collage_keeps_only_the_object_whole(tmp_path: Path) -> None:
    import numpy as np
    import unseen_data
    from PIL import Image

    generator = np.random.default_rng(1)
    paths = []
    for index in range(9):
        path = tmp_path / f"{index}.png"
        Image.fromarray(generator.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    canvas = np.asarray(unseen_data.paint(paths, position=4, shuffle=7))
    for cell, path in enumerate(paths):
        row, col = divmod(cell, 3)
        painted = canvas[row * 32 : row * 32 + 32, col * 32 : col * 32 + 32]
        assert np.array_equal(painted, np.asarray(Image.open(path))) == (cell == 4)


def test_the_recipe_defaults_follow_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each protocol's flags default to the recipe chosen on its own validation classes."""
    for name, chosen in unseen.CHOSEN_RECIPES.items():
        monkeypatch.setattr(sys, "argv", ["unseen.py", "--protocol", name])
        parsed = unseen.build_parser().parse_args()
        assert parsed.protocol == name
        for key, value in chosen.items():
            assert getattr(parsed, key) == value
    assert unseen.parse_defaults("objects").epochs != unseen.parse_defaults("textures").epochs
