"""perco-eval end to end on tiny models, the evaluation sets, and the tiny backbones."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import entry_point
from hydra import compose, initialize_config_dir

from perco import CONFIG_DIR
from perco.data.coco import prepare_coco
from perco.data.eval_sets import coco30k_files, kodak, load_eval_set, prepared_coco
from perco.eval import reconstruction_seed, run
from perco.io import load_image, save_image
from perco.plot import main as plot_main

CONFIGS = str(CONFIG_DIR)


@pytest.fixture
def photos(tmp_path):
    """Three small photos of two sizes (an odd count, grouped by size) with captions."""
    folder = tmp_path / "photos"
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(176, 192), (192, 176), (176, 192)]):
        save_image(torch.rand(3, h, w, generator=g), folder / f"p{i}.png")
    (folder / "captions.tsv").write_text("p0\ta red square\np2\tgrey noise\n")
    return folder


def config_overrides(photos, out, *extra) -> list[str]:
    return [
        "dataset=folder",
        f"dataset.root={photos}",
        f"dataset.captions={photos / 'captions.tsv'}",
        "metrics=offline",
        "metrics.patch_size=64",
        f"output_dir={out}",
        "eval.steps=[2]",
        "eval.batch_size=2",
        "eval.grid_images=2",
        *extra,
    ]


def config(photos, out, *extra):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        return compose("eval", overrides=config_overrides(photos, out, *extra))


def assert_close(a: dict, b: dict) -> None:
    """Same results up to float rounding (a batch's composition changes the last bits)."""
    assert a.keys() == b.keys()
    for key, values in a.items():
        if key == "rate":
            assert values == b[key]
        elif key in ("fid", "kid", "kid_std"):
            # 30 patches of 256-d features: a singular covariance amplifies the rounding of
            # a few 8-bit pixels (the results carry a note saying FID is indicative here)
            assert values == pytest.approx(b[key], rel=0.1, abs=0.05), key
        else:
            assert values == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_offline_vgg_metrics_add_lpips_on_vgg16_beside_alexnet(assets):
    from perco.eval.cli import load_backbones

    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("eval", overrides=["metrics=offline_vgg"])
    backbones = load_backbones(cfg.metrics, "cpu")
    assert (backbones.lpips.net, backbones.lpips_vgg.net) == ("alex", "vgg")
    assert backbones.dists is not None and backbones.features is not None  # offline's too
    assert backbones.describe()["lpips_vgg"] == "lpips v0.1 vgg"


def test_eval_writes_csv_json_plot_and_grid_and_resumes(photos, tmp_path, assets):
    out = tmp_path / "eval"
    doc = run(config(photos, out, "eval.samples=2", "eval.steps=[2,3]"))
    folder = out / "r0.0019"
    for name in ("per_image.csv", "results.json", "plot.png", "grid.png"):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader((folder / "per_image.csv").open()))
    # 3 images x (2 step counts x 2 samples + the autoencoder ceiling)
    assert len(rows) == 15
    coded = [r for r in rows if r["series"] != "autoencoder"]
    assert all(float(r["bpp_file"]) > float(r["bpp_payload"]) > 0 for r in coded)
    assert {r["series"] for r in rows} == {"steps=2", "steps=3", "autoencoder"}
    assert all(float(r["diversity_lpips"]) > 0 for r in coded)
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(doc))
    res = doc["results"]
    assert res["steps"] == [2, 3] and len(res["bpp"]) == 2 and len(res["fid"]) == 2
    assert doc["protocol"]["fid_features"].startswith("alexnet")
    assert "lpips_vgg" not in res  # metrics=offline_vgg adds it
    assert doc["protocol"]["images"] == 3 and doc["autoencoder_ceiling"]["psnr"] > 0
    assert "indicative" in doc["fid_note"]
    grid = load_image(folder / "grid.png")[0]  # labelled: column titles above, ids left
    assert grid.shape[-2] == 36 + 2 * (192 + 4) and (grid[:, :30, 60:] < 0.3).any()
    assert (grid[:, 116:156, :40] < 0.3).any() and (grid[:, :36, :40] > 0.99).all()

    # a rerun decodes nothing that is cached: drop one image's cache entry
    cache = folder / "cache"
    kept = {p: p.stat().st_mtime_ns for p in cache.glob("p[01].json")}
    (cache / "p2.json").unlink()
    again = run(config(photos, out, "eval.samples=2", "eval.steps=[2,3]"))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (cache / "p2.json").is_file()
    assert_close(again["results"], doc["results"])  # p2 decoded alone: float rounding only

    with pytest.raises(ValueError, match="different settings"):
        run(config(photos, out, "eval.steps=[4]"))


def test_paper_protocol_captions_at_encode_time_and_codes_them_with_zlib(
    photos, tmp_path, blip2_dir
):
    from perco.captioning import Blip2Captioner
    from perco.io import to_pil

    doc = run(
        config(
            photos, tmp_path / "paper", "protocol=paper", f"eval.captioner=blip2:{blip2_dir}",
            "eval.ceiling=false",
        )
    )  # fmt: skip
    proto = doc["protocol"]
    assert proto["captions"] == f"captioner blip2:{blip2_dir}, at encode time"
    assert proto["caption_codec"] == "zlib" and proto["caption_codecs_used"] == ["zlib"]
    assert (proto["captioned_images"], proto["uncaptioned_images"]) == (3, 0)
    assert proto["guidance"] == "text" and proto["guidance_scale"] == 3.0
    rows = list(csv.DictReader((tmp_path / "paper" / "r0.0019" / "per_image.csv").open()))
    captioner = Blip2Captioner(blip2_dir)
    for row in rows:  # each image got the caption the captioner makes of it, zlib-coded
        image = load_image(photos / f"{row['id']}.png")[0]
        assert row["caption"] == captioner([to_pil(image)], [row["id"]])[0] != ""
        assert row["caption_codec"] == "zlib" and int(row["caption_bits"]) > 0
    departures = doc["departures_from_paper"]
    assert any(d.startswith("captions: captioner blip2:") for d in departures)  # a stand-in
    assert any(d.startswith("steps [2]") for d in departures)
    assert not any("caption codec" in d or "guidance" in d for d in departures)
    from perco.plot import curves

    assert list(curves([doc], "bpp_payload")) == ["perco [zlib captions]"]  # plot legend


def test_the_protocol_never_claims_captions_that_images_did_not_get(photos, tmp_path):
    (photos / "captions.tsv").unlink()  # a set without ground-truth captions, like Kodak
    overrides = ["dataset.captions=null", "eval.ceiling=false"]
    doc = run(config(photos, tmp_path / "gt", *overrides))
    proto = doc["protocol"]
    assert proto["captions"] == "none (ground-truth gave no caption for any image)"
    assert (proto["captioned_images"], proto["uncaptioned_images"]) == (0, 3)
    assert "decoded without a caption by a text-conditioned model" in doc["warnings"][0]
    assert any("3 of 3 images decoded without a caption" in d for d in doc["departures_from_paper"])
    assert any("caption codec" in d for d in doc["departures_from_paper"])


def test_results_do_not_depend_on_batching_and_seeds_are_per_reconstruction(
    photos, tmp_path, assets
):
    a = run(config(photos, tmp_path / "a", "eval.batch_size=1", "eval.ceiling=false"))
    b = run(config(photos, tmp_path / "b", "eval.batch_size=3", "eval.ceiling=false"))
    assert_close(a["results"], b["results"])
    seeds = {reconstruction_seed(0, i, k) for i in ("p0", "p1") for k in (0, 1)}
    assert len(seeds) == 4 and reconstruction_seed(0, "p0", 0) == reconstruction_seed(0, "p0", 0)


def test_bad_dataset_is_a_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "perco.eval", "dataset=folder",
           f"dataset.root={tmp_path / 'missing'}", f"output_dir={tmp_path / 'o'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("perco-eval: error:")


def test_perco_plot_merges_results_and_rejects_bad_files(photos, tmp_path, assets):
    run(config(photos, tmp_path / "e", "eval.ceiling=false"))
    out = tmp_path / "curves.pdf"
    assert plot_main([str(tmp_path / "e"), "-o", str(out), "--reference", "perco-sd-kodak"]) == 0
    assert out.read_bytes().startswith(b"%PDF")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert plot_main([str(bad), "-o", str(tmp_path / "x.png")]) == 1


def test_kodak_set_keeps_native_sizes(assets):
    data = kodak(assets / "kodak")
    assert len(data) == 24
    sizes = {data.image_size(i) for i in range(len(data))}
    assert sizes == {(512, 768), (768, 512)}
    assert data[3]["image"].shape == (3, 768, 512)  # kodim04 is portrait


def test_transforms_and_bad_sets(photos):
    captions = photos / "captions.tsv"
    resized = load_eval_set("folder", photos, captions=captions, transform="resize", size=64)
    assert resized[1]["image"].shape == (3, 64, 64) and resized[0]["captions"] == ["a red square"]
    cropped = load_eval_set("folder", photos, transform="center-crop", size=96)
    assert cropped[1]["image"].shape == (3, 96, 96)
    with pytest.raises(ValueError, match="needs a size"):
        load_eval_set("folder", photos, transform="resize")
    with pytest.raises(ValueError, match="unknown evaluation set"):
        load_eval_set("imagenet", photos)


def test_coco30k_list_is_shipped():
    files = coco30k_files()
    assert len(files) == 30000 and len(set(files)) == 30000
    assert files[0] == "000000000009.jpg"


def test_prepare_coco_writes_images_captions_and_label_maps(assets, tmp_path):
    mini = assets / "coco-mini"
    names = sorted(p.name for p in (mini / "val2017").glob("*.jpg"))[:6]
    n = prepare_coco(
        mini / "val2017",
        mini / "annotations" / "captions_val2017.json",
        tmp_path / "coco",
        files=names,
        instances_json=mini / "annotations" / "instances_val2017_mini.json",
        size=128,
    )
    assert n == 6
    data = prepared_coco(tmp_path / "coco")
    item = data[0]
    assert item["image"].shape == (3, 128, 128) and len(item["captions"]) >= 5
    labelled = [data[i]["labels"] for i in range(len(data)) if data[i]["labels"] is not None]
    assert labelled, "coco-mini has instance masks for some of these images"
    values = torch.unique(torch.cat([lab.flatten() for lab in labelled]))
    assert set(values.tolist()) - {255} <= set(data.label_names)
    assert data.label_names[1] == "person"
    with pytest.raises(FileNotFoundError, match="listed images"):
        prepare_coco(mini / "val2017", mini / "annotations" / "captions_val2017.json",
                     tmp_path / "x", files=["nope.jpg"])  # fmt: skip


def test_perco_download_verifies_pixel_checksums(assets, tmp_path):
    from perco.cli.download import download_kodak

    url = (assets / "kodak").resolve().as_uri() + "/{name}"
    assert download_kodak(tmp_path / "k", url) == 0
    assert len(list((tmp_path / "k").glob("*.png"))) == 24
    # a wrong image under a Kodak name is refused and nothing is written
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(1, 25):
        os.symlink((assets / "kodak" / "kodim01.png").resolve(), bad / f"kodim{i:02d}.png")
    assert download_kodak(tmp_path / "k2", bad.resolve().as_uri() + "/{name}") == 1
    assert [p.name for p in (tmp_path / "k2").glob("*.png")] == ["kodim01.png"]


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(photos, tmp_path, assets):
    one = run(config(photos, tmp_path / "one"))
    overrides = [
        "dataset=folder", f"dataset.root={photos}",
        f"dataset.captions={photos / 'captions.tsv'}", "metrics=offline", "metrics.patch_size=64",
        f"output_dir={tmp_path / 'two'}", "eval.steps=[2]", "eval.batch_size=2",
        "eval.grid_images=2", f"paths.assets_dir={assets}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "perco.eval", *overrides]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "r0.0019" / "results.json").read_text())
    assert_close(one["results"], two["results"])
    assert two["protocol"]["images"] == 3


def tiny_clip():
    """A small random open_clip CLIP with the real CLIP tokenizer (stand-in weights)."""
    import open_clip

    from perco.metrics.clip_score import ClipScorer

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg={"layers": 1, "width": 32, "patch_size": 16, "image_size": 64, "head_width": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    )
    return ClipScorer(model, open_clip.get_tokenizer("ViT-L-14"), name="tiny random CLIP")


def tiny_segmenter(tmp_path, names: dict[int, str]):
    """A random SegFormer saved and loaded back through ``Segmenter.from_pretrained``."""
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    from perco.metrics.miou import Segmenter

    labels = dict(enumerate(["background", *names.values()]))
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        num_attention_heads=[1, 1], decoder_hidden_size=16, patch_sizes=[7, 3], strides=[4, 2],
        mlp_ratios=[2, 2], id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path / "seg")
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "seg")
    return Segmenter.from_pretrained(str(tmp_path / "seg"))


def test_clip_scores_with_a_tiny_open_clip():
    clip = tiny_clip()
    x = torch.rand(2, 3, 80, 96)
    assert torch.allclose(clip.image_image(x, x), torch.full((2,), 100.0), atol=1e-3)
    text = clip.text_image(x, ["a dog on a sofa", "two parrots"])
    assert text.shape == (2,) and (text >= 0).all() and (text <= 100).all()


def test_coco_evaluation_with_clip_and_segmenter_stand_ins(assets, tmp_path):
    """The COCO path end to end: ground-truth captions condition the decoder, CLIP scores
    against another caption, mIoU against label maps (tiny random stand-in backbones)."""
    from perco.eval import Backbones, EvalSettings, evaluate
    from perco.metrics import LPIPSDistance
    from perco.metrics.fid_kid import AlexNetFeatures
    from perco.testing import tiny_perco

    mini = assets / "coco-mini"
    instances = json.loads((mini / "annotations" / "instances_val2017_mini.json").read_text())
    names = [img["file_name"] for img in instances["images"]][:3]
    prepare_coco(mini / "val2017", mini / "annotations" / "captions_val2017.json",
                 tmp_path / "coco", files=names, size=64,
                 instances_json=mini / "annotations" / "instances_val2017_mini.json")  # fmt: skip
    data = prepared_coco(tmp_path / "coco", name="coco-mini")
    weights = assets / "lpips" / "alexnet_features.safetensors"
    backbones = Backbones(
        LPIPSDistance("alex", weights), AlexNetFeatures(weights), tiny_clip(),
        tiny_segmenter(tmp_path, data.label_names),
    )  # fmt: skip
    settings = EvalSettings(steps=[2], fid_variant="whole", batch_size=3)
    doc = evaluate(tiny_perco("r0.0019").eval(), data, settings, backbones, tmp_path / "out")
    res = doc["results"]
    assert 0 <= res["miou"][0] <= 1 and 0 <= doc["autoencoder_ceiling"]["miou"] <= 1
    assert res["clip_text"][0] >= 0 and res["clip_image"][0] <= 100
    assert doc["protocol"]["clip"] == "tiny random CLIP"
    assert doc["protocol"]["captions"] == "ground-truth"
    rows = list(csv.DictReader((tmp_path / "out" / "per_image.csv").open()))
    assert all(int(r["caption_bits"]) > 0 for r in rows if r["series"] == "steps=2")


def perco_eval_cli():
    return entry_point("perco-eval")


@pytest.mark.slow
def test_the_cli_takes_a_checkpoint_a_rate_sweep_and_accelerate_launch(photos, tmp_path, assets):
    """The README's spellings: `perco-eval checkpoint=<sweep folder> rate=<rung>`, a
    `-m ... 'rate=glob(...)'` sweep, and `accelerate launch ... -m perco.eval`."""
    from perco.testing import tiny_perco

    sweep = tmp_path / "runs" / "tiny"
    for rate in ("r0.0019", "r0.0059"):
        tiny_perco(rate).save_pretrained(sweep / rate / "model")
    common = [
        "dataset=folder", f"dataset.root={photos}", "metrics=offline", "metrics.patch_size=64",
        "eval.steps=[1]", "eval.ceiling=false", f"paths.assets_dir={assets}",
        f"checkpoint={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def perco_eval(*args, launcher=None):
        launcher = launcher or [perco_eval_cli()]
        done = subprocess.run(
            [*launcher, *args], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]

    perco_eval(*common, "rate=r0.0059", f"output_dir={tmp_path / 'one'}")
    assert (tmp_path / "one" / "r0.0059" / "results.json").is_file()
    perco_eval(
        "-m",
        *common,
        "rate=glob(r0.00*,exclude=[r0.0024,r0.0098])",
        f"output_dir={tmp_path / 'sweep'}",
    )
    for rate in ("r0.0019", "r0.0059"):
        assert (tmp_path / "sweep" / rate / "results.json").is_file()
    accelerate = entry_point("accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "perco.eval"]
    perco_eval(*common, "rate=r0.0019", f"output_dir={tmp_path / 'two'}", launcher=launch)
    results = json.loads((tmp_path / "two" / "r0.0019" / "results.json").read_text())
    assert results["protocol"]["images"] == 3


def test_perco_eval_help_names_the_options_and_presets():
    done = subprocess.run([perco_eval_cli(), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for word in ("checkpoint=", "rate=", "protocol=paper", "metrics=offline", "per_image.csv"):
        assert word in done.stdout, word


def test_a_backbone_that_cannot_load_is_one_line_naming_the_offline_preset(photos, tmp_path):
    cmd = [perco_eval_cli(), "dataset=folder", f"dataset.root={photos}", "metrics=offline",
           f"metrics.lpips.backbone={tmp_path / 'missing.safetensors'}",
           f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("perco-eval: error: cannot load the LPIPS alex backbone")
    assert "metrics=offline" in last


def test_a_registered_metric_reaches_the_csv_json_table_and_plot(photos, tmp_path, assets):
    """One registry entry, named through `imports=`, and it is everywhere."""
    module = tmp_path / "my_metrics.py"
    module.write_text(
        "from perco.eval import Metric, register\n"
        "register(Metric('l1', lambda b: {'l1': (b.x - b.y).abs().mean((1, 2, 3))}))\n"
    )
    out = tmp_path / "eval"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cmd = [perco_eval_cli(), *config_overrides(photos, out), "imports=[my_metrics]"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = out / "r0.0019"
    rows = list(csv.DictReader((folder / "per_image.csv").open()))
    assert all(float(r["l1"]) > 0 for r in rows)  # every series, the ceiling too
    doc = json.loads((folder / "results.json").read_text())
    steps = [float(r["l1"]) for r in rows if r["series"] == "steps=2"]
    assert doc["results"]["l1"] == [pytest.approx(sum(steps) / len(steps))]
    header = next(line for line in done.stdout.splitlines() if line.startswith("series"))
    assert "l1" in header.split()  # a column of the printed table
    assert plot_main([str(folder), "-o", str(tmp_path / "l1.png"), "--metrics", "l1"]) == 0


def test_several_rungs_in_one_table_with_references_once(photos, tmp_path, assets):
    """rates=[...]: each rung as a single run would write it, one summary table, the
    ceiling and JPEG with the first rung, the control with the top one, timing."""
    from perco.eval import LatentCache
    from perco.testing import tiny_perco

    runs = tmp_path / "runs"
    models = {rate: tiny_perco(rate).eval() for rate in ("r0.0019", "r0.0059")}
    for rate, model in models.items():
        model.save_pretrained(runs / rate / "model")
    key = {LatentCache.autoencoder_key(m) for m in models.values()}
    assert len(key) == 1  # same autoencoder: the rungs share their latents

    out = tmp_path / "eval"
    extra = ["rates=[r0.0019,r0.0059]", "eval.jpeg=[5]", "eval.control=true"]
    summary = run(config(photos, out, f"checkpoint={runs}", *extra, "eval.timing_repeats=1"))
    rows = summary["rows"]
    assert list(rows) == [
        "perco r0.0019", "perco r0.0059", "autoencoder alone (ceiling)",
        "JPEG quality 5 (Pillow)", "control: r0.0059 from shuffled z_l (2 images)",
    ]  # fmt: skip
    assert rows["JPEG quality 5 (Pillow)"]["bpp_file"] > 0
    series = {rate: {r["series"] for r in csv.DictReader((out / rate / "per_image.csv").open())}
              for rate in models}  # fmt: skip
    assert series == {"r0.0019": {"steps=2", "autoencoder", "jpeg q=5"},
                      "r0.0059": {"steps=2", "control"}}  # fmt: skip
    control = [r for r in csv.DictReader((out / "r0.0059" / "per_image.csv").open())
               if r["series"] == "control"]  # fmt: skip
    assert sorted(r["id"] for r in control) == ["p0", "p2"]  # p1 is alone in its size
    assert set(summary["timing"]) == set(models)
    text = (out / "summary.md").read_text()
    assert "| perco r0.0059 |" in text and (out / "grid.png").is_file()


def test_compared_families_get_rows_beside_each_rung_decoded_as_saved(photos, tmp_path):
    """compare=[students]: the one-step students of a sweep decode the teacher's files (the
    same bpp) in one U-Net call, in rows after the teacher's step counts at each rung, with
    the timing table's U-Net calls and decode-time ratios; misuse is one clear error."""
    from perco.models.student import one_step_student
    from perco.testing import tiny_perco

    teachers, students = tmp_path / "runs" / "teacher", tmp_path / "runs" / "student"
    for rate in ("r0.0019", "r0.0059"):
        teacher = tiny_perco(rate).eval()
        teacher.save_pretrained(teachers / rate / "model")
        one_step_student(teacher).save_pretrained(students / rate / "model")
    out = tmp_path / "eval"
    extra = ["rates=[r0.0019,r0.0059]", f"compare=[{students}]", "eval.steps=[2,1]",
             "eval.timing_repeats=1", "eval.ceiling=false"]  # fmt: skip
    summary = run(config(photos, out, f"checkpoint={teachers}", *extra))
    assert list(summary["rows"]) == [
        "perco r0.0019 (2 steps)", "perco r0.0019 (1 step)", "student r0.0019 (1 step)",
        "perco r0.0059 (2 steps)", "perco r0.0059 (1 step)", "student r0.0059 (1 step)",
    ]  # fmt: skip
    for rate in ("r0.0019", "r0.0059"):
        teacher, student = (summary["rows"][f"{n} {rate} (1 step)"] for n in ("perco", "student"))
        assert student["bpp_file"] == teacher["bpp_file"]  # the teacher's files
        doc = json.loads((out / "student" / rate / "results.json").read_text())
        assert doc["results"]["steps"] == [1] and "one-step student" in doc["protocol"]["sampler"]
        timing = summary["timing"][rate]
        assert timing[f"student {rate} (1 step)"]["U-Net calls"] == "1"
        assert timing[f"perco {rate} (2 steps), cfg text"]["U-Net calls"] == "2"  # batched CFG
    text = (out / "summary.md").read_text()
    assert "| student r0.0059 (1 step) |" in text and "decode time / first row's" in text
    assert summary["compared"]["student"]["r0.0019"].endswith("results.json")

    with pytest.raises(ValueError, match="give rates"):
        run(config(photos, out, f"checkpoint={teachers}", "rate=r0.0019", f"compare=[{students}]"))
    with pytest.raises(ValueError, match="names must differ"):
        run(config(photos, out, f"checkpoint={teachers}", "rates=[r0.0019]",
                   f"compare=[{students},{tmp_path / 'student'}]"))  # fmt: skip


def test_classic_codecs_rate_matched_in_the_rung_table_with_bd_rates(photos, tmp_path, assets):
    """eval.references: each codec at each target, "cannot reach" per image where even its
    smallest file is larger, the protocol naming library, version and settings, and the
    BD-rate section never extrapolating."""
    pytest.importorskip("imagecodecs", reason="the codecs extra")
    from perco.testing import tiny_perco

    runs = tmp_path / "runs"
    for rate in ("r0.0019", "r0.0059"):
        tiny_perco(rate).eval().save_pretrained(runs / rate / "model")
    out = tmp_path / "eval"
    extra = ["rates=[r0.0019,r0.0059]", "eval.references=[jpeg,webp]", "eval.ceiling=false",
             "eval.reference_bpp=[0.01,1.5,3]", "eval.bd_anchor=jpeg"]  # fmt: skip
    summary = run(config(photos, out, f"checkpoint={runs}", *extra))
    rows = summary["rows"]
    (label,) = [k for k in rows if k.startswith("JPEG ≤0.0100 bpp: cannot reach (smallest ")]
    unreached = rows[label]
    assert unreached["images"] == 0 and len(unreached["cannot_reach"]) == 3
    assert all(b > 0.01 for b in unreached["cannot_reach"].values())
    reached = rows["JPEG ≤3.0000 bpp (3/3 images)"]
    assert reached["bpp_file"] <= 3 and reached["lpips"] > 0
    doc = json.loads((out / "r0.0019" / "results.json").read_text())
    proto = doc["protocol"]
    assert proto["reference_targets_bpp"] == [0.01, 1.5, 3]
    assert proto["reference_codecs"]["webp"]["library"].startswith("imagecodecs ")
    assert "cannot reach" in proto["reference_rate_matching"]
    csv_rows = list(csv.DictReader((out / "r0.0019" / "per_image.csv").open()))
    cut = [r for r in csv_rows if r["series"] == "jpeg@0.0100"]
    assert len(cut) == 3 and all(r["cannot_reach"] == "True" and not r["lpips"] for r in cut)
    assert not (out / "r0.0059" / "per_image.csv").read_text().count("jpeg@")  # once
    bd = summary["bd_rate"]
    assert bd["anchor"] == "jpeg" and bd["anchor_points"] >= 1
    text = (out / "summary.md").read_text()
    assert "BD-rate of the rungs against JPEG" in text
    # the tiny rungs' LPIPS (~1.1) and JPEG's at 1.5–3 bpp (~0.1–0.3) share no range
    assert "- lpips: not computed: no overlap in lpips" in text


def test_a_model_with_an_index_prior_reports_both_rates(photos, tmp_path, assets):
    from perco.models.index_prior import ContextPrior
    from perco.testing import tiny_perco

    model = tiny_perco("r0.0019")
    torch.manual_seed(0)
    model.set_index_prior(ContextPrior(256, model.quantizer.config.codebook_dim, 16),
                          {"fitted_on": "images: elsewhere"})  # fmt: skip
    model.save_pretrained(tmp_path / "m")
    checkpoint = f"checkpoint={tmp_path / 'm'}"
    doc = run(config(photos, tmp_path / "out", checkpoint, "eval.ceiling=false"))
    res, proto = doc["results"], doc["protocol"]
    assert "learned context prior" in proto["index_coding"] and "elsewhere" in proto["index_coding"]
    assert any("entropy-coded" in d for d in doc["departures_from_paper"])
    assert res["bpp_uniform"][0] > 0 and res["bpp_uniform"][0] != res["bpp"][0]
    with open(tmp_path / "out" / "r0.0019" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["bpp_uniform"]) > 0 for r in rows)


def test_plot_curves_at_the_uniform_coding_rate():
    from perco.plot import curves

    learned = {"name": "a", "results": {"bpp": [0.01], "bpp_uniform": [0.013],
                                        "steps": [5], "lpips": [0.5]}}  # fmt: skip
    uniform = {"name": "b", "results": {"bpp": [0.02], "steps": [5], "lpips": [0.4]}}
    drawn = curves([learned, uniform], "bpp", uniform_too=True)
    assert drawn["a"][0][0] == 0.01 and drawn["a [uniform coding]"][0][0] == 0.013
    assert "b [uniform coding]" not in drawn  # already uniformly coded
    at_uniform = curves([learned, uniform], "bpp_uniform")
    assert at_uniform["a"][0][0] == 0.013 and at_uniform["b"][0][0] == 0.02


def test_grid_cells_sit_under_their_column_titles_whatever_the_orientation(tmp_path):
    """A portrait row's cells are centred in the landscape row's columns (issue 28)."""
    from types import SimpleNamespace

    from perco.io import save_image
    from perco.plot import reconstruction_grid

    images = {"wide": torch.zeros(3, 64, 96), "tall": torch.zeros(3, 96, 64)}  # black
    for name, image in images.items():
        save_image(image, tmp_path / f"{name}_0.png")

    class Data:
        items = [SimpleNamespace(id=name) for name in images]

        def __getitem__(self, i):
            return {"image": list(images.values())[i]}

    grid = reconstruction_grid(Data(), [tmp_path], list(images), height=48)
    left, top, cell_h = 60, 36, 48 + 4  # label margins of plot._label; 2 px cell borders

    def dark_runs(row: int) -> list[tuple[int, int]]:
        band = grid[:, top + row * cell_h + 2 : top + (row + 1) * cell_h - 2, left:]
        cols = (band.mean(0) < 0.5).any(0).nonzero().flatten().tolist()
        starts = [c for c in cols if c - 1 not in cols]
        ends = [c for c in cols if c + 1 not in cols]
        return list(zip(starts, ends, strict=True))

    wide, tall = dark_runs(0), dark_runs(1)
    assert [b - a + 1 for a, b in wide] == [72, 72] and [b - a + 1 for a, b in tall] == [32, 32]
    for (a, b), (c, d) in zip(wide, tall, strict=True):  # same column, same centre
        assert abs((a + b) - (c + d)) <= 1
