"""Each head against a reference (numpy kNN, sklearn logistic regression, the CheXzero
formula, the paper's MLP) and on planted-signal vectors."""

from __future__ import annotations

import numpy as np
import pytest

from cxrembed.errors import ConfigError, DataError
from cxrembed.heads import available_heads, make_head
from cxrembed.heads.linear import fit_logistic
from cxrembed.labels import LABELS
from cxrembed.metrics import mean_auc, per_class_auc

DIM = 48


def planted_vectors(n: int, seed: int = 0, signal: float = 3.0):
    """Unit-ish vectors: noise plus one direction per positive class; prompts aligned."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(14, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    y = (rng.random((n, 14)) < 0.15).astype(np.uint8)
    y[:14] = np.eye(14, dtype=np.uint8)  # every class present
    x = rng.normal(size=(n, DIM)) + signal * y @ directions
    text = {name: (directions[c] + 0.3 * rng.normal(size=(2, DIM)),
                   -directions[c] + 0.3 * rng.normal(size=(1, DIM)))
            for c, name in enumerate(LABELS)}
    return x.astype(np.float32), y, text


@pytest.fixture(scope="module")
def data():
    x, y, text = planted_vectors(2400, seed=0)
    return {"train": (x[:240], y[:240]), "val": (x[240:480], y[240:480]),
            "test": (x[480:], y[480:]), "text": text}


def _auc(y, scores):
    return mean_auc(per_class_auc(y, scores, warn=False), warn=False)


def test_registry_lists_heads_and_refuses_unknown_names_and_options():
    assert {"zeroshot", "mlp", "linear", "knn", "tip"} <= set(available_heads())
    with pytest.raises(ConfigError, match="expected one of"):
        make_head("svm")
    with pytest.raises(ConfigError, match=r"unknown knn head option\(s\) kk; valid: k, "):
        make_head("knn", kk=3)
    with pytest.raises(ConfigError, match="prompt embeddings"):
        make_head("tip")


@pytest.mark.parametrize("name", ["zeroshot", "mlp", "linear", "knn", "tip"])
def test_every_head_beats_chance_on_planted_signal(data, name):
    kwargs = {"text": data["text"]} if name in ("zeroshot", "tip") else {}
    if name == "mlp":
        kwargs["epochs"] = 8
    head = make_head(name, **kwargs)
    head.fit(*data["train"], *data["val"])
    scores = head.predict(data["test"][0])
    assert scores.shape == (len(data["test"][0]), 14)
    assert _auc(data["test"][1], scores) > 0.8, name


def test_knn_equals_numpy_brute_force_weighted_vote():
    rng = np.random.default_rng(1)
    shots = rng.normal(size=(60, DIM)).astype(np.float32)
    labels = (rng.random((60, 14)) < 0.3).astype(np.uint8)
    queries = rng.normal(size=(200, DIM)).astype(np.float32) * 5  # any norm
    head = make_head("knn", k=7, temperature=0.1).fit(shots, labels)
    got = head.predict(queries)

    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries).astype(np.float64) @ unit(shots).astype(np.float64).T
    expected = np.empty((200, 14))
    for i in range(200):
        top = np.argsort(-sims[i])[:7]
        w = np.exp(sims[i, top] / 0.1)
        expected[i] = (w[:, None] * labels[top]).sum(axis=0) / w.sum()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def knn_reference(sims: np.ndarray, labels: np.ndarray, k: int, temperature: float,
                  known: np.ndarray | None = None) -> np.ndarray:
    """Exact kNN vote spelled out row by row: a full stable sort (ties: earliest shot),
    softmax over the k, the share of (known) neighbours positive."""
    known = np.ones(labels.shape, bool) if known is None else known
    out = np.empty((len(sims), labels.shape[1]))
    for i, row in enumerate(sims.astype(np.float64)):
        top = np.argsort(-row, kind="stable")[:k]
        w = np.exp((row[top] - row[top].max()) / temperature)[:, None]
        weight = (w * known[top]).sum(axis=0)
        votes = (w * labels[top] * known[top]).sum(axis=0)
        out[i] = np.divide(votes, weight, out=np.zeros_like(votes), where=weight > 0)
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_knn_on_the_sweeps_similarities_equals_the_reference_with_ties(masked):
    """The sweep hands knn the query-shot cosines: the k nearest found from them, ties at
    the k-th similarity included (earliest shots kept), agree with a full sort; a query
    whose neighbours all carry (or all lack) a class scores exactly 1 (or 0)."""
    from cxrembed.heads.knn import top_k

    rng = np.random.default_rng(7)
    shots, n, k = 40, 300, 6
    labels = (rng.random((shots, 14)) < 0.4).astype(np.uint8)
    labels[:, 0] = 1  # every neighbour positive: exactly 1
    labels[:, 1] = 0  # none: exactly 0
    known = rng.random((shots, 14)) > 0.3 if masked else None
    sims = np.round(rng.uniform(-1, 1, (n, shots)), 1).astype(np.float32)  # many ties
    sims[:5] = 0.5  # every shot tied
    values, columns = top_k(sims, k)
    for i in range(n):
        expected = np.sort(np.argsort(-sims[i], kind="stable")[:k])
        np.testing.assert_array_equal(columns[i], expected)
        np.testing.assert_array_equal(values[i], sims[i, expected])
    head = make_head("knn", k=k, temperature=0.05).fit(
        rng.normal(size=(shots, DIM)).astype(np.float32), labels, known=known)
    got = head.predict(None, similarity=sims)
    expected = knn_reference(sims, labels, k, 0.05, known)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert set(np.unique(got[:, 0])) <= {0.0, 1.0} and (got[:, 1] == 0.0).all()
    if not masked:
        assert (got[:, 0] == 1.0).all()


def test_knn_with_fewer_shots_than_k_uses_all():
    head = make_head("knn", k=50).fit(np.eye(5, DIM, dtype=np.float32), np.eye(5, 14))
    assert head.selected["k"] == 5
    assert head.predict(np.eye(5, DIM)).shape == (5, 14)


def test_linear_head_solves_sklearns_problem():
    from sklearn.linear_model import LogisticRegression

    from cxrembed.heads.base import single_thread

    x, y, _ = planted_vectors(150, seed=2, signal=1.0)
    x = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    y = y[:, :7]
    Cs = np.array([0.1, 10.0])
    with single_thread():
        w, b, info = fit_logistic(x, np.tile(2.0 * y - 1, (1, 2)), np.repeat(Cs, 7), tol=1e-8,
                                  max_iter=5000)
        assert info["converged"]
        for j, C in enumerate(Cs):
            for c in range(7):
                ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(x, y[:, c])
                k = j * 7 + c
                scale = max(1.0, np.abs(ref.coef_).max())
                np.testing.assert_allclose(w[:, k], ref.coef_[0], rtol=0, atol=2e-4 * scale)
                assert abs(b[k] - ref.intercept_[0]) <= 2e-4 * max(1.0, abs(ref.intercept_[0]))


def test_linear_head_picks_C_on_val_and_defaults_without_val(data):
    head = make_head("linear", Cs=(0.01, 1.0, 100.0)).fit(*data["train"], *data["val"])
    assert head.selected["by"] == "val" and head.selected["C"] in (0.01, 1.0, 100.0)
    # the C kept is the one whose val AUC is best
    best = max((make_head("linear", Cs=(C,)).fit(*data["train"], *data["val"]).selected
                ["val_mean_auc"], C) for C in (0.01, 1.0, 100.0))
    assert head.selected["C"] == best[1]
    alone = make_head("linear").fit(*data["train"])
    assert alone.selected["by"] == "default" and alone.selected["C"] == 1.0


def test_linear_head_gives_constant_scores_to_a_class_without_positives(data):
    x, y = data["train"]
    y = y.copy()
    y[:, 4] = 0
    head = make_head("linear").fit(x, y)
    assert head.selected["unfittable"] == [4]
    assert np.ptp(head.predict(data["test"][0])[:, 4]) == 0


def test_zeroshot_is_chexzeros_softmax_over_averaged_prompts(data):
    text = data["text"]
    head = make_head("zeroshot", text=text)
    x = data["test"][0][:50]
    got = head.predict(x)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    xs = unit(x.astype(np.float64))
    for c, name in enumerate(LABELS):
        pos = unit(unit(text[name][0]).mean(axis=0))
        neg = unit(unit(text[name][1]).mean(axis=0))
        cp, cn = xs @ pos, xs @ neg
        np.testing.assert_allclose(got[:, c], np.exp(cp) / (np.exp(cp) + np.exp(cn)), atol=1e-6)
    np.testing.assert_allclose(head.logits(x), 100 * np.log(got / (1 - got)), atol=1e-3)


def test_zeroshot_refuses_vectors_of_another_encoder(data):
    head = make_head("zeroshot", text=data["text"])
    with pytest.raises(DataError, match="different encoders"):
        head.predict(np.ones((3, DIM + 1), np.float32))


def test_tip_adapter_with_alpha_zero_is_zero_shot_and_selects_on_val(data):
    zs = make_head("zeroshot", text=data["text"])
    tip = make_head("tip", text=data["text"], alphas=(0.0,), betas=(1.0,))
    tip.fit(*data["train"], *data["val"])
    np.testing.assert_allclose(tip.predict(data["test"][0]), zs.logits(data["test"][0]),
                               atol=1e-9)
    tip = make_head("tip", text=data["text"]).fit(*data["train"], *data["val"])
    assert tip.selected["by"] == "val"
    assert tip.selected["alpha"] in tip.config.alphas and tip.selected["beta"] in tip.config.betas


def test_mlp_head_is_the_papers_head_and_starts_from_given_weights():
    torch = pytest.importorskip("torch")
    from cxrembed.model.head import DiagnosisHead as PaperHead

    torch.manual_seed(3)
    adapted = PaperHead(in_dim=DIM).eval()
    x, y, _ = planted_vectors(64, seed=3)
    head = make_head("mlp", init_state=adapted.state_dict(), lr=0.0, weight_decay=0.0,
                     epochs=2).fit(x, y)
    with torch.no_grad():
        expected = adapted(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(head.predict(x), expected, atol=1e-5)
    assert head.selected["init"] == "adapted"
    assert sum(p.numel() for p in head.module.parameters()) == sum(
        p.numel() for p in adapted.parameters())
    with pytest.raises(Exception, match="do not fit"):
        make_head("mlp", init_state=PaperHead(in_dim=DIM + 1).state_dict()).fit(x, y)


def test_mlp_is_reproducible_leaves_global_rng_alone_and_fit_many_matches_fit(data):
    torch = pytest.importorskip("torch")
    from cxrembed.heads.mlp import MLPHead

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    x, y = data["train"]
    a = make_head("mlp", seed=5, epochs=4).fit(x, y, *data["val"])
    assert torch.equal(torch.random.get_rng_state(), state)
    b = make_head("mlp", seed=5, epochs=4).fit(x, y, *data["val"])
    np.testing.assert_array_equal(a.predict(data["test"][0]), b.predict(data["test"][0]))
    c = make_head("mlp", seed=6, epochs=4).fit(x, y, *data["val"])
    assert not np.array_equal(a.predict(x), c.predict(x))
    # trained together (as the sweep does), each member ends where it ends alone
    members = MLPHead.fit_many([MLPHead(seed=5, epochs=4), MLPHead(seed=6, epochs=4)],
                               [(x, y, *data["val"]), (x[:100], y[:100], *data["val"])])
    np.testing.assert_allclose(members[0].predict(x), a.predict(x), atol=1e-4)
    alone = MLPHead(seed=6, epochs=4).fit(x[:100], y[:100], *data["val"])
    np.testing.assert_allclose(members[1].predict(x), alone.predict(x), atol=1e-4)
    assert members[1].selected == alone.selected


def test_batched_mlp_training_equals_each_seed_trained_alone(data):
    """The sweep trains a shot count's seeds as one batched problem: members of different
    sizes (a last batch of a different width), one with unknown labels, one without a val
    sample, stopping early at different epochs, each end where it ends trained alone."""
    pytest.importorskip("torch")
    from cxrembed.heads.mlp import MLPHead

    x, y = data["train"]
    x_val, y_val = data["val"]
    known = np.random.default_rng(3).random(y[:37].shape) > 0.2
    noise = y_val[:60][np.random.default_rng(1).permutation(60)]  # val AUC soon stalls
    members = [(x[:37], y[:37], x_val, y_val, known), (x[40:90], y[40:90], x_val[:60],
               noise, None), (x[100:121], y[100:121], None, None, None)]
    options = dict(epochs=8, patience=2, batch_size=8, lr=0.01)
    together = MLPHead.fit_many([MLPHead(seed=s, **options) for s in (4, 5, 6)], members)
    test = data["test"][0]
    for seed, head, (xs, ys, xv, yv, kn) in zip((4, 5, 6), together, members):
        alone = MLPHead(seed=seed, **options).fit(xs, ys, xv, yv, known=kn)
        assert head.selected == alone.selected
        np.testing.assert_allclose(head.predict(test), alone.predict(test), atol=1e-4)
    assert together[2].selected["by"] == "last"
    assert together[1].selected["epochs_run"] < together[0].selected["epochs_run"] < 8


def test_stacked_adamw_is_torchs_adamw_per_member():
    """Three members stepped in changing subsets, and reordered in their slots midway (as
    the trainer does when a member stops), equal three torch.optim.AdamW optimisers that
    step only when their member has a batch."""
    torch = pytest.importorskip("torch")
    from cxrembed.heads.mlp import MLPConfig
    from cxrembed.heads.mlp_train import _AdamW

    config = MLPConfig(lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 4, 5, generator=gen)
    stacked = {"w": start.clone()}
    ours = _AdamW(stacked, config)
    alone = [start[i].clone().requires_grad_(True) for i in range(3)]
    reference = [torch.optim.AdamW([p], lr=config.lr, betas=config.betas, eps=config.eps,
                                   weight_decay=config.weight_decay) for p in alone]
    slot_member = [0, 1, 2]
    for members in ([0, 1, 2], [0, 2], [1], "reorder", [0, 1, 2], [2], [1, 0]):
        if members == "reorder":  # slot j takes what slot order[j] held
            order = torch.tensor([2, 0, 1])
            stacked = {"w": stacked["w"][order].contiguous()}
            ours.reorder(stacked, order)
            slot_member = [slot_member[j] for j in order.tolist()]
            continue
        grad = torch.randn(len(members), 4, 5, generator=gen)
        ours.step([slot_member.index(m) for m in members], {"w": grad})
        for g, m in zip(grad, members):
            alone[m].grad = g.clone()
            reference[m].step()
    for slot, m in enumerate(slot_member):
        torch.testing.assert_close(stacked["w"][slot], alone[m].detach(), rtol=0, atol=1e-6)


def test_mlp_predict_many_equals_each_heads_own_forward(data):
    torch = pytest.importorskip("torch")
    from cxrembed.heads.mlp import MLPHead

    x, y = data["train"]
    heads = MLPHead.fit_many([MLPHead(seed=s, epochs=2, predict_batch=64) for s in (1, 2, 3)],
                             [(x, y, None, None)] * 3)
    test = data["test"][0]
    together = MLPHead.predict_many(heads, test)
    for head, scores in zip(heads, together):
        with torch.no_grad():
            expected = head.module(torch.from_numpy(test)).double().numpy()
        np.testing.assert_allclose(scores, expected, atol=1e-5)
        assert scores.shape == (len(test), 14)


def test_mlp_on_cuda_without_a_gpu_is_refused_by_name(data):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ConfigError, match="--device cuda: .*(no CUDA device|without CUDA)"):
        make_head("mlp", device="cuda").fit(*data["train"])
