"""Quality tasks: targets are what the task says, never visible in the input; seeded and reproducible."""

import math

import pytest
import torch

from attnzoo.bench.quality import tasks
from attnzoo.bench.quality.tasks import IGNORE, make_task


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_mqar_targets_are_the_values_of_the_queried_keys():
    t = make_task("mqar", {"pairs": 5, "seq_len": 41, "vocab": 64})
    x, y = t.sample(7, _g())
    assert x.shape == y.shape == (7, 41)
    for b in range(7):
        table = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(5)}
        assert len(table) == 5  # distinct keys
        pos = (y[b] != IGNORE).nonzero().flatten()
        assert len(pos) == 5 and (pos >= 10).all()
        for p in pos:
            assert table[int(x[b, p])] == int(y[b, p])  # a key in the input, its value only in the target
            assert int(y[b, p]) not in x[b, 10:].tolist()  # no value token after the context
    x2, y2 = t.sample(7, _g())
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_selective_copy_outputs_the_data_tokens_in_order():
    t = make_task("selective_copy", {"seq_len": 23, "tokens": 4, "vocab": 16})
    x, y = t.sample(5, _g(1))
    for b in range(5):
        data = [int(v) for v in x[b, :18] if v >= 3]
        assert data == [int(v) for v in y[b, -4:]]
        assert int(x[b, 18]) == 1 and (x[b, -4:] == 2).all() and (y[b, :-4] == IGNORE).all()


def test_passkey_targets_are_the_slot_tagged_digits_after_the_key_marker():
    t = make_task("passkey", {"seq_len": 63, "digits": 5})
    x, y = t.sample(6, _g(2))
    for b in range(6):
        start = int((x[b] == 16).nonzero()[0])
        tagged = x[b, start + 1: start + 6]
        assert (tagged - 23 - 10 * torch.arange(5)).tolist() == y[b, -5:].tolist()  # 18 + D + 10 i + d
        assert x[b, -5:].tolist() == [18, 19, 20, 21, 22] and int(x[b, -6]) == 17
        assert (y[b, :-5] == IGNORE).all() and ((y[b, -5:] >= 0) & (y[b, -5:] < 10)).all()


def test_passkey_key_lies_at_least_min_distance_before_the_question():
    t = make_task("passkey", {"seq_len": 100, "digits": 5, "min_distance": 60})
    x, _ = t.sample(400, _g(3))
    start = (x == 16).float().argmax(1)
    assert (95 - start >= 60).all()  # the first question is at L - D = 95
    assert int(start.min()) == 0 and int(start.max()) == 35  # every allowed position is drawn
    with pytest.raises(ValueError, match="min_distance"):
        make_task("passkey", {"seq_len": 100, "digits": 5, "min_distance": 95})


def test_icl_regression_least_squares_is_near_exact_without_noise():
    t = make_task("icl_regression", {"dim": 3, "pairs": 12, "queries": 2, "noise": 0.0, "eval_size": 64})
    x, y = t.sample(4, _g(3))
    assert x.shape == (4, 14, 5) and torch.isnan(y[:, :12]).all() and (x[:, 12:, 3] == 0).all()
    assert t.baselines()["least_squares"] < 1e-10
    # scoring: predicting the targets gives 0, predicting 0 gives 1
    _, ye = t.eval_set()
    assert t.score(torch.nan_to_num(ye), ye) == 0.0
    assert t.score(torch.zeros_like(ye), ye) == pytest.approx(1.0)


def test_listops_values_match_their_expressions():
    t = make_task("listops", {"max_len": 40, "max_depth": 3, "max_args": 3})
    names = {10: max, 11: min, 12: lambda a: sorted(a)[(len(a) - 1) // 2], 13: lambda a: sum(a) % 10}

    def evaluate(tokens):
        stack = [[]]
        for tok in tokens:
            if tok < 10:
                stack[-1].append(tok)
            elif tok in names:
                stack.append([tok])
            elif tok == 14:
                op, *args = stack.pop()
                stack[-1].append(names[op](args))
        return stack[0][0]

    x, y = t.sample(20, _g(4))
    assert (x[:, -1] == 16).all()
    for b in range(20):
        toks = [int(v) for v in x[b, :-1] if v != 15]
        assert evaluate(toks) == int(y[b])


def test_char_lm_bits_per_char_of_a_uniform_model_is_eight():
    t = make_task("char_lm", {"seq_len": 32, "eval_windows": 4})
    assert t.config["corpus"] in ("gensim lee_background.cor", "pydoc_data.topics")
    x, y = t.eval_set()
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert t.score(torch.zeros(*y.shape, 256), y) == pytest.approx(8.0)


def test_english_text_falls_back_to_the_stdlib(monkeypatch):
    monkeypatch.setattr(tasks, "_package_file", lambda *a: None)
    import builtins

    real = builtins.__import__

    def no_gensim(name, *a, **k):
        if name.startswith("gensim"):
            raise ImportError("no gensim")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_gensim)
    text, src = tasks.english_text()
    assert src == "pydoc_data.topics" and len(text) > 100_000


def test_digits_split_is_fixed():
    pytest.importorskip("sklearn")
    t = make_task("digits", {})
    assert t.train[0].shape == (1437, 8, 8) and t.test[0].shape == (360, 8, 8)
    assert 0 <= float(t.train[0].min()) and float(t.train[0].max()) <= 1
    assert torch.equal(make_task("digits", {}).test[1], t.test[1])


def test_unknown_task_and_bad_config_raise():
    with pytest.raises(ValueError, match="task: unknown"):
        make_task("mqra", {})
    with pytest.raises(ValueError, match="vocab"):
        make_task("mqar", {"pairs": 40, "seq_len": 100, "vocab": 16})
    assert math.isfinite(make_task("mqar", {}).baselines()["chance"])


def test_skimage_patches_split_is_disjoint_balanced_and_fixed():
    pytest.importorskip("skimage")
    t = make_task("skimage_patches", {"patch": 16, "eval_size": 40})
    assert (t.classes, t.side, t.seq_len, t.input) == (10, 16, 256, "image")
    x, y = t.eval_set()
    assert x.shape == (40, 16, 16) and torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 4))
    assert torch.equal(make_task("skimage_patches", {"patch": 16, "eval_size": 40}).eval_set()[0], x)
    xs, ys = t.sample(8, torch.Generator().manual_seed(0))
    assert xs.shape == (8, 16, 16) and ys.shape == (8,) and int(ys.max()) < 10
    # training crops lie in the top part, evaluation crops in the bottom part of each image: no shared pixels
    for train, test in zip(t.train_parts, t.test_parts):
        assert train.shape[1] == test.shape[1] and train.shape[0] > 3 * test.shape[0] - 3
    # an evaluation crop is found in its image's test part and nowhere in the train part
    img = t.test_parts[int(y[0])]
    crop = x[0] * t.std + t.mean
    windows = img.unfold(0, 16, 1).unfold(1, 16, 1)  # (H - 15, W - 15, 16, 16) every crop of the test part
    assert ((windows - crop).abs().amax(dim=(-1, -2)) < 1e-5).any()
    with pytest.raises(ValueError, match="test_fraction"):
        make_task("skimage_patches", {"test_fraction": 1.5})


def test_image_tasks_train_grid_channel_and_sequence_models():
    pytest.importorskip("skimage")
    from attnzoo.bench.quality import NO_ATTENTION, applicability, train_case

    t = make_task("skimage_patches", {"patch": 8, "eval_size": 20})
    assert applicability(t, NO_ATTENTION) == ("channel", False)
    for mech, model in (("neighborhood_2d", "grid"), ("eca", "channel"), ("softmax", "sequence"),
                        (NO_ATTENTION, "channel")):
        rec = train_case(t, mech, seed=0, steps=2, budget=30, options={}, dim=16, heads=1 if mech == "eca" else 2)
        assert rec["status"] == "ok" and rec["model"] == model and 0 <= rec["value"] <= 1, rec["message"]


def test_every_task_is_in_the_results_schema():
    from attnzoo.bench.quality import TASKS
    from attnzoo.bench.results import load_schema

    enums = []

    def walk(node):
        if isinstance(node, dict):
            task = node.get("properties", {}).get("task") if isinstance(node.get("properties"), dict) else None
            if isinstance(task, dict) and "enum" in task:
                enums.append(set(task["enum"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(load_schema())
    assert enums and all(set(TASKS) <= e for e in enums), (sorted(TASKS), enums)


def test_landmark_model_carries_landmark_tokens_through_every_layer():
    """The quality model trains Landmark Attention as the paper does: a landmark token after every block in
    the stream (its module built with interleaved=True), so in the second layer the landmarks' inputs differ
    per block (they attended to their own block in the first layer) -- with one per-layer landmark embedding
    every landmark key is equal and the grouped softmax cannot prefer the block that holds the answer. The
    landmark rows are dropped before the head; the decode state counts the stream's positions."""
    from attnzoo.bench.quality.models import SequenceModel
    from attnzoo.bench.quality.train import decode_state_bytes

    torch.manual_seed(0)
    net = SequenceModel("landmark", vocab=20, out=20, seq_len=16, dim=16, layers=2, heads=2,
                        options={"block_size": 4})
    assert all(b.attn.interleaved for b in net.blocks) and net.stream_token is not None
    assert net.stream_length(16) == 20 and net.pos.shape == (20, 16)
    seen = []
    net.blocks[1].attn.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    x = torch.randint(0, 20, (2, 16))
    out = net(x)
    assert out.shape == (2, 16, 20)
    lm_rows = seen[0][:, 4::5]  # (B, 4, dim): the landmarks' inputs to the second layer, one per block
    assert lm_rows.shape[1] == 4 and (lm_rows - lm_rows[:, :1]).abs().amax() > 1e-3
    out.sum().backward()
    assert net.stream_token.grad.abs().sum() > 0  # the landmark token is learned
    st = net.blocks[0].attn.init_state(1)
    net.blocks[0].attn(torch.randn(1, 20, 16), state=st)
    assert decode_state_bytes(net, 16, 16) == 2 * st.nbytes()
    plain = SequenceModel("softmax", vocab=20, out=20, seq_len=16, dim=16, layers=2, heads=2)
    assert plain.stream_token is None and plain.stream_length(16) == 16
