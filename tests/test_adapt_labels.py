"""adapt on any label set: a head sized from the data, unknown labels masked out of the
loss and of val selection, the run's label names carried to encode and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cxrembed.adapt import AdaptConfig, adapt, auc_report, undefined_classes
from cxrembed.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


def tiny(**values) -> AdaptConfig:
    base = dict(model="cxr-tiny", pretrained="none", workers=0, lr_encoder=1e-3, lr_head=1e-3,
                epochs=1, batch_size=32, eval_batch_size=64)
    base.update(values)
    return AdaptConfig.from_dict(base)


def test_masked_focal_loss_is_the_mean_over_known_cells_and_gives_them_no_gradient():
    from cxrembed.model.loss import focal_bce_with_logits, train_pos_weight

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(12, 5, generator=g) * 3).requires_grad_(True)
    targets = (torch.rand(12, 5, generator=g) < 0.3).float()
    known = torch.rand(12, 5, generator=g) < 0.7
    loss = focal_bce_with_logits(logits, targets, known=known)
    # by hand (Lin et al.'s formula), cell by cell, averaged over the known cells only
    total, count = 0.0, 0
    for i, j in zip(*np.nonzero(known.numpy())):
        x, y = float(logits[i, j]), float(targets[i, j])
        p = 1 / (1 + np.exp(-x))
        p_t, alpha_t = (p, 0.25) if y == 1 else (1 - p, 0.75)
        total += -alpha_t * (1 - p_t) ** 2 * np.log(p_t)
        count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    loss.backward()
    assert (logits.grad[~known] == 0).all() and (logits.grad[known] != 0).all()
    # a masked cell's target does not matter at all
    flipped = torch.where(known, targets, 1 - targets)
    torch.testing.assert_close(focal_bce_with_logits(logits.detach(), flipped, known=known),
                               loss.detach())
    # all known: the plain mean, as before masks existed
    torch.testing.assert_close(focal_bce_with_logits(logits.detach(), targets,
                                                     known=torch.ones_like(known)),
                               focal_bce_with_logits(logits.detach(), targets))
    # class weights count known labels only: 2 positives, 3 known negatives, 5 unknown
    labels = np.zeros((10, 1), np.uint8)
    labels[:2] = 1
    mask = np.zeros((10, 1), bool)
    mask[:5] = True
    assert train_pos_weight(labels, mask)[0] == 1.5


def test_val_auc_with_unknown_labels_equals_sklearn_on_the_known_rows():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.4).astype(np.uint8)
    scores = rng.normal(size=(60, 4)) + labels
    known = rng.random((60, 4)) < 0.75
    known[:, 3] = labels[:, 3] == 0  # class 3: no known positive -> undefined
    names = ("Lung Opacity", "Edema", "Pleural Effusion", "Fracture")
    aucs, mean, undefined = auc_report(labels, scores, known, names)
    for c in range(3):
        rows = known[:, c]
        assert aucs[c] == pytest.approx(roc_auc_score(labels[rows, c], scores[rows, c]))
    # unknown cells are not negatives: counting them so gives another figure
    assert aucs[0] != pytest.approx(roc_auc_score(labels[:, 0], scores[:, 0]))
    assert np.isnan(aucs[3]) and undefined == ["Fracture"]
    assert mean == pytest.approx(np.mean(aucs[:3]))  # undefined left out, as on test
    assert undefined_classes(labels, known, names) == ["Fracture"]


@pytest.fixture(scope="module")
def chexpert_run(tmp_path_factory):
    """One epoch on a CheXpert twin with uncertain labels masked (--uncertain ignore); the
    (targets, known) of every training step are recorded."""
    from cxrembed.data import load_dataset
    from cxrembed.data.synth_formats import make_format_twin
    from cxrembed.model import loss

    tmp = tmp_path_factory.mktemp("chx")
    root = make_format_twin(tmp / "chexpert", "chexpert", images=120, size=32, seed=1,
                            workers=1)
    steps = []
    real = loss.focal_bce_with_logits

    def recording(logits, targets, **kwargs):
        steps.append((targets.detach().clone(), kwargs["known"].detach().clone()))
        return real(logits, targets, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loss, "focal_bce_with_logits", recording)
        result = adapt(root, tmp / "run", tiny(), data_options={"dataset": "chexpert",
                                                                "uncertain": "ignore"},
                       progress=False)
    dataset = load_dataset(root, "chexpert", uncertain="ignore")
    return {"root": root, "run": tmp / "run", "result": result, "dataset": dataset,
            "steps": steps, "tmp": tmp}


def test_adapt_on_chexpert_sizes_the_head_and_masks_uncertain_labels(chexpert_run):
    from cxrembed.adapt.loop import epoch_batches

    dataset, run = chexpert_run["dataset"], chexpert_run["run"]
    names = list(dataset.label_names)
    assert len(names) == 13 and "Pleural Effusion" in names and "Effusion" not in names
    meta = json.loads((run / "model.json").read_text())
    assert meta["head"]["num_classes"] == 13
    assert meta["labels"] == names and meta["vocabulary"] == "chexpert"
    config = json.loads((run / "config.json").read_text())
    assert config["label_names"] == names and config["dataset"] == "chexpert"
    assert config["data_options"] == {"dataset": "chexpert", "uncertain": "ignore"}
    result = chexpert_run["result"]
    assert result.label_names == names and list(result.val_auc) == names
    assert list(json.loads((run / "summary.json").read_text())["test_auc"]) == names
    # the run as a head (predict, serve): its card names the run's classes
    from cxrembed.heads.saved import load_head

    head = load_head(run)
    assert head.label_names == names and head.card["vocabulary"] == "chexpert"
    assert head.predict(np.zeros((2, 512), np.float32)).scores.shape == (2, 13)
    # the loss saw exactly the dataset's mask, row for row in the epoch's order
    order = np.concatenate(epoch_batches(dataset.split_rows("train"), tiny(), 1))
    seen_known = torch.cat([k for _, k in chexpert_run["steps"]]).numpy()
    seen_targets = torch.cat([t for t, _ in chexpert_run["steps"]]).numpy()
    assert (~dataset.label_known[order]).sum() > 0
    np.testing.assert_array_equal(seen_known, dataset.label_known[order])
    np.testing.assert_array_equal(seen_targets, dataset.labels[order])


@pytest.mark.slow
def test_encode_with_the_run_then_evaluate_gives_the_datasets_classes(chexpert_run):
    """adapt -> encode --checkpoint -> evaluate --head adapted on CheXpert: the logits are
    stored under CheXpert's names, test AUCs equal the run's own, and the val AUCs the run
    selected on equal sklearn's on the known rows of each class."""
    from cxrembed.cli import app
    from cxrembed.store import EmbeddingStore

    root, run, tmp = chexpert_run["root"], chexpert_run["run"], chexpert_run["tmp"]
    store = tmp / "adapted.h5"
    done = runner.invoke(app, ["encode", str(root), "--out", str(store), "--checkpoint",
                               str(run), "--dataset", "chexpert", "--no-progress"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["evaluate", str(store), "--head", "adapted", "--bootstrap", "0",
                               "--json"])
    assert done.exit_code == 0, done.output
    scored = json.loads(done.stdout[done.stdout.index("{"):])
    names = list(chexpert_run["dataset"].label_names)
    assert scored["labels"] == names
    summary = chexpert_run["result"]
    for name in names:
        assert scored["auc"][name] == pytest.approx(summary.test_auc[name], abs=1e-5) \
            if summary.test_auc[name] is not None else scored["auc"][name] is None
    with EmbeddingStore.open(store) as opened:
        assert opened.head_label_names == names
        val = opened.select(split="val")
        logits, labels = opened.head_logits(val), opened.labels[val]
        known = np.asarray(opened.label_known[val], dtype=bool)
    for c, name in enumerate(names):
        rows = known[:, c]
        if len(set(labels[rows, c])) < 2:
            assert summary.val_auc[name] is None
        else:
            assert summary.val_auc[name] == pytest.approx(
                roc_auc_score(labels[rows, c], logits[rows, c]), abs=1e-5)


CHEXPERT_RESULT = {
    "format": "cxrembed.eval", "protocol": "adapted-head", "split": "test", "n_rows": 40,
    "mean_auc": 0.7, "source": {"dataset": "chexpert", "store": "chexpert.h5",
                                "eval_set": {"split": "test", "n": 40, "ids_sha256": "a" * 64}},
    "auc": {"Enlarged Cardiomediastinum": 0.61, "Lung Opacity": 0.72, "Edema": 0.73,
            "Pleural Effusion": 0.84, "Support Devices": 0.6}}


def test_compare_lists_the_stores_own_classes_with_published_cells_only_where_they_match():
    from cxrembed.compare import PAPER, compare_results, published_per_class

    comparison = compare_results([CHEXPERT_RESULT])
    rows = {r["class"]: r for r in comparison.table1()}
    assert list(rows) == [*CHEXPERT_RESULT["auc"], "Mean"]  # not NIH's 14
    paper = f"{PAPER} (published)"
    ours = comparison.ours[0].name
    published = published_per_class()[PAPER]
    assert rows["Pleural Effusion"][paper] == published["Effusion"]  # by the label map
    assert rows["Edema"][paper] == published["Edema"]  # by name
    for name in ("Enlarged Cardiomediastinum", "Lung Opacity", "Support Devices"):
        assert rows[name][paper] is None and rows[name][ours] == CHEXPERT_RESULT["auc"][name]
    assert rows["Mean"][paper] is None and rows["Mean"][ours] == 0.7  # NIH's 14-class mean
    note = next(n for n in comparison.notes if n.startswith("classes:"))
    assert "chexpert" in note and "Pleural Effusion = NIH Effusion" in note
    assert comparison.to_dict()["classes"] == list(CHEXPERT_RESULT["auc"])
    # a label set sharing nothing with NIH's: no published column at all, and said so
    other = dict(CHEXPERT_RESULT, auc={"COVID-19": 0.8, "Viral": 0.7},
                 source=dict(CHEXPERT_RESULT["source"], dataset="csv"))
    alone = compare_results([other])
    assert alone.published == [] and [r["class"] for r in alone.table1()] == [
        "COVID-19", "Viral", "Mean"]
    assert any("none matches an NIH" in n for n in alone.notes)


def test_report_table_lists_non_nih_classes(tmp_path):
    from cxrembed.report import write_report

    (tmp_path / "head.json").write_text(json.dumps(CHEXPERT_RESULT))
    page = write_report([tmp_path / "head.json"], tmp_path / "report.html").path.read_text()
    table = page[page.index("<h2>Per-class test AUC"):]
    table = table[:table.index("</table>")]
    for name in CHEXPERT_RESULT["auc"]:
        assert f"<tr><td>{name}</td>" in table
    assert "<tr><td>Hernia</td>" not in table and "<tr><td>Effusion</td>" not in table
    assert "Pleural Effusion = NIH Effusion" in page


def test_demo_takes_the_reader_options_and_refuses_them_without_data(tmp_path):
    from cxrembed.cli import app

    done = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--dataset", "csv",
                               "--label-col", "findings"])
    assert isinstance(done.exception, ConfigError)
    assert "--dataset, --label-col describe a real data folder" in str(done.exception)
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_on_a_labelled_csv_runs_end_to_end_with_its_own_classes(tmp_path):
    """demo --data on the csv twin (label columns with -1 and blanks: unknown labels): the
    head, every protocol, the searches and the report use the CSV's classes."""
    from cxrembed.data.synth_formats import CSV_CLASSES, make_format_twin
    from cxrembed.demo import DemoConfig, run_demo

    root = make_format_twin(tmp_path / "csv", "csv", images=80, size=32, seed=2, workers=1)
    options = {"dataset": "csv", "image_col": "image", "label_cols": ",".join(CSV_CLASSES),
               "patient_col": "patient_id", "split_col": "split", "uncertain": "ignore"}
    config = DemoConfig(data=str(root / "labels.csv"), data_options=options, epochs=1,
                        seeds=1, shots=(1,), heads=("linear", "zeroshot"), searches=1,
                        device="cpu")
    result = run_demo(tmp_path / "demo", config, progress=False)
    classes = list(CSV_CLASSES)
    meta = json.loads((tmp_path / "demo/adapt/model.json").read_text())
    assert meta["labels"] == classes and meta["head"]["num_classes"] == len(classes)
    assert set(result.protocols) == {"zero-shot (frozen CLIP)", "zero-shot (adapted)",
                                     "adapted head", "few-shot linear, 1-shot"}
    for name, protocol in result.protocols.items():
        assert protocol["labels"] == classes, name
    summary = json.loads((tmp_path / "demo/summary.json").read_text())
    assert summary["dataset"]["dataset"] == "csv"
    adapt_step = next(s for s in summary["steps"] if s["name"] == "domain adaptation")
    assert "--dataset csv" in adapt_step["command"] and "--uncertain ignore" in adapt_step[
        "command"]
    for search in summary["searches"]:
        assert set(search["query"]["labels"]) <= set(classes)
        assert (tmp_path / "demo" / search["montage"]).is_file()
    page = result.report.read_text()
    table = page[page.index("<h2>Per-class test AUC"):]
    for name in classes:
        assert f"<tr><td>{name}</td>" in table[:table.index("</table>")]
