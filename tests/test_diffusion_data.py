"""Image preference data: the four row formats, their PATH:ROW: field errors, the latent cache."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from preftune.diffusion.imagedata import read_image_records
from preftune.diffusion.phase import adapt_image_examples, to_examples
from preftune.errors import ConfigError, DataError


def png(path: Path, colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path.read_bytes()


def write(path: Path, rows: list[dict[str, object]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, bytes]:
    return {
        name: png(tmp_path / "img" / f"{name}.png", c)
        for name, c in (("red", (255, 0, 0)), ("blue", (0, 0, 255)))
    }


def test_formats(tmp_path: Path, images: dict[str, bytes]) -> None:
    """Pairs, Pick-a-Pic (label_0 = 0 swaps, 0.5 is a dropped tie), per-image labels, two captions
    and a base64 image all become records with the chosen image first."""
    blue64 = "data:image/png;base64," + base64.b64encode(images["blue"]).decode()
    path = write(tmp_path / "d.jsonl", [
        {"prompt": "p", "chosen": "img/red.png", "rejected": "img/blue.png"},
        {"caption": "c", "jpg_0": "img/red.png", "jpg_1": blue64, "label_0": 0},
        {"caption": "c", "jpg_0": "img/red.png", "jpg_1": "img/blue.png", "label_0": 0.5},
        {"prompt": "k", "image": "img/red.png", "label": False},
        {"chosen_prompt": "a red", "rejected_prompt": "a blue", "chosen": "img/red.png", "rejected": "img/blue.png"},
    ])  # fmt: skip
    records, counts = read_image_records(path)
    assert counts == {"rows": 5, "ties": 1, "invalid": 0}
    assert [r.row for r in records] == [1, 2, 4, 5]
    assert records[0].images == [images["red"], images["blue"]] and records[0].captions == ["p"]
    assert records[1].images == [images["blue"], images["red"]] and records[1].fields == ("jpg_1", "jpg_0")
    assert records[2].kind == "unpaired" and records[2].label == 0.0
    assert records[3].captions == ["a red", "a blue"]
    latents = {
        d: torch.full((1,), float(i)) for i, d in enumerate(sorted({d for r in records for d in r.digests}))
    }
    texts = {c: torch.zeros(1) for r in records for c in r.captions}
    examples = to_examples(records, latents, texts)
    assert [len(e.meta["text"]) for e in examples] == [1, 1, 1, 2]  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="row 4 is a per-image row"):
        adapt_image_examples(examples, "pairwise", path)
    unpaired = adapt_image_examples(examples, "unpaired", path)
    assert [e.label for e in unpaired] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert unpaired[-1].meta["text"] == [texts["a blue"]]  # the rejected image keeps its own caption


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "img/red.png", "rejected": "img/none.png"},
         "d.jsonl:1: field 'rejected': no image file 'img/none.png'"),
        ({"caption": "c", "jpg_0": "img/red.png", "jpg_1": "img/blue.png", "label_0": 2},
         "d.jsonl:1: field 'label_0': expected 0 or 0.5 or 1, got 2 — set label_0 to 0 or 0.5 or 1"),
        ({"prompt": "", "chosen": "img/red.png", "rejected": "img/blue.png"},
         "d.jsonl:1: field 'prompt': expected a non-empty caption"),
        ({"prompt": "p", "image": "img/red.png", "label": "yes"},
         "d.jsonl:1: field 'label': expected 0 or 1, got 'yes'"),
        ({"prompt": "p", "chosen": 3, "rejected": "img/blue.png"},
         "d.jsonl:1: field 'chosen': expected an image, got int"),
        ({"text": "p", "img": "img/red.png"},
         "d.jsonl:1: not an image preference row (fields: img, text) — give one of these sets"),
    ],
)  # fmt: skip
def test_row_errors(tmp_path: Path, images: dict[str, bytes], row: dict[str, object], message: str) -> None:
    path = write(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as err:
        read_image_records(path)
    assert message in str(err.value) and str(err.value).startswith(str(tmp_path))


def test_drop_counts_invalid_rows_and_unreadable_image(tmp_path: Path, images: dict[str, bytes]) -> None:
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    path = write(tmp_path / "d.jsonl", [
        {"prompt": "p", "chosen": "img/red.png", "rejected": "img/missing.png"},
        {"prompt": "p", "chosen": "img/red.png", "rejected": "img/bad.png"},
    ])  # fmt: skip
    records, counts = read_image_records(path, on_invalid="drop")
    assert counts["invalid"] == 1 and [r.row for r in records] == [2]
    from preftune.diffusion.encode import pixels

    with pytest.raises(DataError, match=r"d.jsonl:2: field 'rejected': cannot read the image"):
        pixels(records[0].images[1], 8, where=lambda: (path, 2, "rejected"))


def test_pixels_resize_and_crop(tmp_path: Path) -> None:
    """A 16×8 image: shorter side to 4 → 8×4, centre crop 4×4; values in [−1, 1]."""
    from PIL import Image

    from preftune.diffusion.encode import pixels

    image = Image.new("RGB", (16, 8), (255, 0, 0))
    for x in range(8):
        for y in range(8):
            image.putpixel((x, y), (0, 0, 255))  # left half blue
    file = tmp_path / "wide.png"
    image.save(file)
    out = pixels(file.read_bytes(), 4, where=lambda: ("", 0, ""))
    assert out.shape == (3, 4, 4)
    assert float(out[2, 0, 0]) == 1.0 and float(out[0, 0, -1]) == 1.0  # blue left, red right
    assert float(out.min()) >= -1.0


def test_cache_fingerprint_changes_with_an_image(tmp_path: Path) -> None:
    from preftune.diffusion.encode import data_fingerprint

    a = data_fingerprint("parts", 16, ["x", "y"], ["p"])
    assert a == data_fingerprint("parts", 16, ["y", "x"], ["p"])  # order-free
    assert a != data_fingerprint("parts", 16, ["x", "z"], ["p"])
    assert a != data_fingerprint("parts", 32, ["x", "y"], ["p"])
    assert a != data_fingerprint("other", 16, ["x", "y"], ["p"])


def test_pair_scores_become_smpos_smoothed_label(tmp_path: Path, images: dict[str, bytes]) -> None:
    """chosen_score / rejected_score → p = σ(s_w − s_l); one without the other is an error."""
    import math

    pair = {"prompt": "p", "chosen": "img/red.png", "rejected": "img/blue.png"}
    path = write(tmp_path / "d.jsonl", [{**pair, "chosen_score": 0.5, "rejected_score": -0.25}, pair])
    records, _ = read_image_records(path)
    assert records[0].label == pytest.approx(1 / (1 + math.exp(-0.75))) and records[1].label is None
    path = write(tmp_path / "e.jsonl", [{**pair, "chosen_score": 1.0}])
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'rejected_score': expected a number, got None"):
        read_image_records(path)


def test_data_check_reads_image_preference_data_as_training_does(
    tmp_path: Path, images: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """`preftune data check` on image pairs: every image resolved and decoded, each bad row named
    (a missing file, bytes that are no image), Pick-a-Pic ties counted; a text pair file is unchanged."""
    from preftune.cli import main

    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    good = write(tmp_path / "good.jsonl", [
        {"prompt": "a red square", "chosen": "img/red.png", "rejected": "img/blue.png"},
        {"caption": "c", "jpg_0": "img/red.png", "jpg_1": "img/blue.png", "label_0": 0.5},
        {"caption": "c", "jpg_0": "img/blue.png", "jpg_1": "img/red.png", "label_0": 0},
    ])  # fmt: skip
    assert main(["data", "check", good]) == 0
    out = capsys.readouterr().out
    assert "OK — 2 rows of image preference data, pairwise (formats: pairs 1, pickapic 1)" in out
    assert "1 ties dropped; images: 8×8 ×4" in out
    bad = write(tmp_path / "bad.jsonl", [
        {"prompt": "p", "chosen": "img/red.png", "rejected": "img/bad.png"},
        {"prompt": "p", "chosen": "img/missing.png", "rejected": "img/blue.png"},
        {"prompt": "p", "chosen": "img/red.png", "rejected": "img/blue.png"},
    ])  # fmt: skip
    assert main(["data", "check", bad]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{bad}:1: field 'rejected': cannot read the image (not a format PIL recognises) — give a "
        "PNG/JPEG/WebP image"
    )
    assert out[1].startswith(f"{bad}:2: field 'chosen': no image file 'img/missing.png'")
    assert out[2] == f"{bad}: 2 problem(s) in image preference data (docs/diffusion.md, 'Data')"
    text = write(tmp_path / "text.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    assert main(["data", "check", text]) == 0
    assert "kind pairwise (text)" in capsys.readouterr().out


def test_captions_longer_than_the_text_encoder_reads_are_named(
    tmp_path: Path, images: dict[str, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    """The tiny pipeline's character tokenizer reads 16 tokens: one per character (CLIP drops the spaces)
    and its two marks. A longer caption is named with its row and length — the encoder sees it cut —
    a caption that fits is not."""
    from preftune.cli import main
    from preftune.diffusion.encode import cut_captions_note, encode_records
    from preftune.diffusion.tiny import save_tiny_pipeline

    lines: list[str] = []
    pipe = save_tiny_pipeline(tmp_path / "pipe")
    pair = {"chosen": "img/red.png", "rejected": "img/blue.png"}
    path = write(tmp_path / "d.jsonl", [
        {"prompt": "a red square", **pair},  # 12 characters: fits
        {"prompt": "a red circle at the top left", **pair},  # 22 characters and 2 marks: 24 tokens
        {"prompt": "a red circle at the top left", **pair},
        {"prompt": "fourteencharss", **pair},  # 14 characters: exactly the limit
    ])  # fmt: skip
    records, _ = read_image_records(path)
    encode_records(records, pipe, data_path=path, cache_dir=tmp_path / "cache", log=lines.append)
    assert "1 of 3 captions are longer than the text encoder reads (16 tokens" in lines[-1]
    assert lines[-1].endswith(f"{path} row 2: 'a red circle at the top left' (24 tokens)")
    assert cut_captions_note(pipe, [("a red square", "x"), ("fourteencharss", "y")]) == ""
    prompts = tmp_path / "prompts.txt"  # `preftune sample` names them too
    prompts.write_text("blue\na red circle at the top left\n")
    assert (
        main(
            [
                "sample",
                "--model",
                str(pipe),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "s"),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert f"{prompts} prompt 2: 'a red circle at the top left' (24 tokens)" in capsys.readouterr().out
