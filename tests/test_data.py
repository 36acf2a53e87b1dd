"""Data: synthetic tasks are deterministic and correct; text files are read, packed and checked."""

import json
from types import SimpleNamespace

import pytest
import torch

from dla.data import IGNORE_INDEX, MQAR, DataConfig, Needle, TextConfig, build_dataset
from dla.errors import ConfigError, DataError


def test_mqar_is_deterministic_by_seed_and_index():
    cfg = DataConfig(task="mqar", seq_len=64, mqar=MQAR(vocab_size=128, num_kv_pairs=6))
    a, b, c = build_dataset(cfg, 3), build_dataset(cfg, 3), build_dataset(cfg, 4)
    assert torch.equal(a.batch(5, 4).input_ids, b.batch(5, 4).input_ids)
    assert torch.equal(a.batch(5, 4).targets, b.batch(5, 4).targets)
    assert not torch.equal(a.batch(5, 4).input_ids, c.batch(5, 4).input_ids)
    assert not torch.equal(a.batch(5, 4).input_ids, a.batch(6, 4).input_ids)


def test_mqar_answers_are_the_values_of_the_queried_keys():
    n = 6
    batch = build_dataset(DataConfig(task="mqar", seq_len=64, mqar=MQAR(vocab_size=128, num_kv_pairs=n)), 0).batch(0, 8)
    for x, y in zip(batch.input_ids, batch.targets):
        pairs = dict(zip(x[0:2 * n:2].tolist(), x[1:2 * n:2].tolist()))
        answers = (y != IGNORE_INDEX).nonzero().flatten()
        assert len(answers) == n and (answers >= 2 * n).all()
        assert [pairs[int(x[t])] for t in answers] == y[answers].tolist()
        assert all(k < 64 for k in pairs) and all(v >= 64 for v in pairs.values())


MIXTURE = [[16, 2], [32, 4], [64, 8]]


def test_mqar_mixture_pads_each_row_of_its_slice_and_is_deterministic():
    task = MQAR(vocab_size=128, num_kv_pairs=8, mixture=MIXTURE, mixture_weights=[2, 1, 1])
    cfg = DataConfig(task="mqar", seq_len=64, mqar=task)
    batch = build_dataset(cfg, 0).batch(0, 64)
    again, other = build_dataset(cfg, 0).batch(0, 64), build_dataset(cfg, 1).batch(0, 64)
    assert torch.equal(batch.input_ids, again.input_ids) and torch.equal(batch.targets, again.targets)
    assert not torch.equal(batch.input_ids, other.input_ids)
    assert batch.input_ids.shape == batch.targets.shape == (64, 64)
    seen = set()
    for x, y in zip(batch.input_ids, batch.targets):
        answers = (y != IGNORE_INDEX).nonzero().flatten()
        n = len(answers)
        length = {2: 16, 4: 32, 8: 64}[n]  # the number of answers names the slice
        seen.add(n)
        pairs = dict(zip(x[0:2 * n:2].tolist(), x[1:2 * n:2].tolist()))
        assert (answers >= 2 * n).all() and (answers < length).all()
        assert [pairs[int(x[t])] for t in answers] == y[answers].tolist()
        assert (x[length:] == 0).all() and (y[length:] == IGNORE_INDEX).all()  # the padding carries no loss
    assert seen == {2, 4, 8}


def test_mqar_mixture_weights_set_the_share_of_each_slice():
    task = MQAR(vocab_size=128, mixture=MIXTURE, mixture_weights=[0, 1, 3])
    batch = build_dataset(DataConfig(task="mqar", seq_len=64, mqar=task), 0).batch(0, 400)
    counts = (batch.targets != IGNORE_INDEX).sum(1).bincount(minlength=9)
    assert counts[2] == 0 and counts[4] + counts[8] == 400 and 0.65 < counts[8] / 400 < 0.85


def test_mqar_without_mixture_is_unchanged_by_it():
    plain = DataConfig(task="mqar", seq_len=64, mqar=MQAR(vocab_size=128, num_kv_pairs=8))
    one = DataConfig(task="mqar", seq_len=64, mqar=MQAR(vocab_size=128, num_kv_pairs=8, mixture=None))
    assert torch.equal(build_dataset(plain, 2).batch(3, 4).input_ids, build_dataset(one, 2).batch(3, 4).input_ids)


def test_mqar_mixture_from_a_config_and_its_errors():
    from dla.train.config import config_from_dict

    cfg = config_from_dict({"data": {"task": "mqar", "seq_len": 64}},
                           ["data.mqar.mixture=[[16, 2], [64, 8]]", "data.mqar.mixture_weights=[5, 1]"])
    assert cfg.data.mqar.mixture == [[16, 2], [64, 8]] and cfg.data.mqar.mixture_weights == [5.0, 1.0]
    for task, message in [(MQAR(mixture=[[128, 4]]), "longer than seq_len"),
                          (MQAR(mixture=[[16, 8]]), "seq_len >= 4"),
                          (MQAR(mixture=[[16, 2]], mixture_weights=[1, 1]), "mixture_weights"),
                          (MQAR(mixture_weights=[1]), "needs a mixture")]:
        with pytest.raises(DataError, match=message):
            build_dataset(DataConfig(task="mqar", seq_len=64, mqar=task), 0)


class InputRecorder(torch.nn.Module):
    """A stand-in model for the evaluations: keeps the inputs it is given, predicts nothing."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.seen = vocab_size, []

    def forward(self, input_ids, use_cache=False):
        self.seen.append(input_ids)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_mqar_eval_uses_one_slice_not_the_training_mixture():
    from dla.eval.recall import mqar_accuracy

    model = InputRecorder(128)
    task = MQAR(vocab_size=128, num_kv_pairs=8, random_non_queries=False, mixture=MIXTURE)
    rows = mqar_accuracy(model, task, [64], [4, 8], examples=6)
    assert [(r["seq_len"], r["num_kv_pairs"], r["examples"]) for r in rows] == [(64, 4, 6), (64, 8, 6)]
    for x, n in zip(model.seen, [4, 8]):  # n pairs and n queries per row: no row of another slice, no padding
        assert x.shape == (6, 64) and ((x != 0).sum(1) == 3 * n).all()


def test_needle_places_the_queried_needle_at_the_depth():
    task = Needle(vocab_size=64, num_needles=3, value_len=2, depth=0.0)
    batch = build_dataset(DataConfig(task="needle", seq_len=40, needle=task), 0).batch(0, 4)
    for x, y in zip(batch.input_ids, batch.targets):
        assert x[0] == x[-2]  # depth 0: the queried needle opens the sequence; its key is asked at the end
        assert y[-2:].tolist() == x[1:3].tolist() and (y[:-2] == IGNORE_INDEX).all()
        assert (x[:-2] < 32).sum() == 3  # three keys in the haystack, nothing else below the value range


def test_needle_mixture_asks_for_every_needle_of_its_slice():
    """A training row of a ``[length, n]`` slice: n needles, then n queries, each query's targets
    the values that follow its key in the haystack; padded to seq_len with 0 and no targets."""
    m, V = 3, 64
    task = Needle(vocab_size=V, value_len=m, mixture=[[32, 2], [64, 4]], mixture_weights=[1, 1])
    batch = build_dataset(DataConfig(task="needle", seq_len=64, needle=task), 0).batch(0, 32)
    lengths = set()
    for x, y in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        length = 32 if x[32:] == [0] * 32 else 64
        n = {32: 2, 64: 4}[length]
        lengths.add(length)
        assert all(t == IGNORE_INDEX for t in y[length:]) and sum(t != IGNORE_INDEX for t in y) == n * m
        haystack = length - n * m
        for j in range(n):
            at = haystack + j * m
            key, answer = x[at], y[at: at + m]
            assert 1 <= key < V // 2 and x[at + 1: at + m] == answer[:-1]
            (where,) = [i for i in range(haystack) if x[i] == key]  # the one needle with that key
            assert x[where + 1: where + 1 + m] == answer
    assert lengths == {32, 64}


def test_needle_training_placements_are_uniform_and_disjoint():
    """Two needles of 3 tokens in 10 positions: 15 pairs of places, 30 with the needles' order,
    each as likely as any other."""
    from collections import Counter

    starts = Needle._spread(30000, 2, 3, 10, torch.Generator().manual_seed(0))
    assert ((starts[:, 0] - starts[:, 1]).abs() >= 3).all() and starts.min() >= 0 and starts.max() <= 10 - 3
    counts = Counter(map(tuple, starts.tolist()))
    assert len(counts) == 30 and max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


def test_needle_eval_uses_one_query_not_the_training_mixture():
    from dla.eval.recall import needle_accuracy

    model = InputRecorder(64)
    task = Needle(vocab_size=64, num_needles=2, value_len=2, mixture=[[32, 4]])
    rows = needle_accuracy(model, task, [48], [0.0, 1.0], examples=5)
    assert [(r["seq_len"], r["depth"]) for r in rows] == [(48, 0.0), (48, 1.0)]
    for x in model.seen:  # 2 needles and 1 query per row, no padding
        assert x.shape == (5, 48) and (((x >= 1) & (x < 32)).sum(1) == 3).all() and (x != 0).all()
    with pytest.raises(DataError, match="too small for 4 needles"):  # keys 1..3
        build_dataset(DataConfig(task="needle", seq_len=64, needle=Needle(vocab_size=8, num_needles=4)), 0)
    with pytest.raises(DataError, match="need a length >= 40"):  # 4 needles of 3 tokens, 4 queries of 2
        build_dataset(DataConfig(task="needle", seq_len=64, needle=Needle(value_len=2, mixture=[[32, 4]])), 0)


class NextInputCopier(torch.nn.Module):
    """A stand-in model that predicts the next input token (token 0 at the last position): under
    teacher forcing it gets every value token of a needle query right but the last."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, use_cache=False):
        following = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], 1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, self.vocab_size).float())


def test_needle_eval_reports_each_value_token():
    from dla.eval.recall import needle_accuracy

    task = Needle(vocab_size=64, num_needles=2, value_len=4)
    rows = needle_accuracy(NextInputCopier(64), task, [48, 64], [0.5], examples=7, batch_size=3)
    assert [(r["accuracy"], r["token_accuracy"]) for r in rows] == [(0.0, [1.0, 1.0, 1.0, 0.0])] * 2


def test_regions_mark_the_parts_of_an_example():
    needle = Needle(vocab_size=64, num_needles=3, value_len=2, depth=0.0)
    batch = build_dataset(DataConfig(task="needle", seq_len=40, needle=needle), 0).batch(0, 4)
    regions = needle.regions(batch)
    for x, m, q in zip(batch.input_ids, regions["needles"], regions["queries"]):
        assert m[:3].all() and int(m.sum()) == 3 * 3  # three needles of 3 tokens, the queried one at depth 0
        assert q[-2:].all() and int(q.sum()) == 2 and not (m & q).any()  # the query (key, value), apart
        assert x[-2] == x[0]  # the query asks for the needle at depth 0
    mqar = MQAR(vocab_size=128, num_kv_pairs=6, random_non_queries=False)
    batch = build_dataset(DataConfig(task="mqar", seq_len=64, mqar=mqar), 0).batch(0, 4)
    regions = mqar.regions(batch)
    assert regions["kv_pairs"].shape == batch.input_ids.shape and int(regions["kv_pairs"][0].sum()) == 12
    queries = regions["queries"]
    assert (queries.sum(1) == 6).all() and (batch.input_ids[queries] < 64).all()  # the queried keys


@pytest.mark.parametrize("task, message", [(MQAR(num_kv_pairs=20), "seq_len >= 4 \\* num_kv_pairs = 80"),
                                           (MQAR(vocab_size=8, num_kv_pairs=4), "vocab_size 8"),
                                           (Needle(num_needles=30), "needles")])
def test_synthetic_tasks_reject_impossible_sizes(task, message):
    with pytest.raises(DataError, match=message):
        name = type(task).__name__.lower()
        build_dataset(DataConfig(task=name, seq_len=64, **{name: task}), 0)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_text_fixed_packing_covers_the_stream_in_seeded_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["abcdefghij" * 3, "klmnop" * 2])
    ds = build_dataset(DataConfig(task="text", seq_len=8, text=TextConfig(paths=[path])), 0)
    assert ds.vocab_size == 257
    rows = torch.cat([ds.batch(i, 1).input_ids for i in range(ds.num_windows)])
    assert torch.equal(ds.batch(0, 2).targets[:, :-1], ds.batch(0, 2).input_ids[:, 1:])
    starts = sorted(int((ds.stream.unfold(0, 8, 8) == r).all(1).nonzero()) for r in rows)
    assert starts == list(range(len(rows)))  # an epoch visits every window once


def test_text_varlen_packing_marks_documents(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["one", "document two", "three!"])
    ds = build_dataset(DataConfig(task="text", seq_len=16, text=TextConfig(paths=[path], packing="varlen")), 0)
    batch = ds.batch(0, 4)
    lengths = batch.cu_seqlens.diff().tolist()
    assert batch.input_ids.shape == (1, sum(lengths)) and sorted(lengths) == [3, 6, 12]
    assert (batch.targets[0, batch.cu_seqlens[1:].long() - 1] == 256).all()  # every document ends with eos


def test_text_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        build_dataset(DataConfig(task="text", text=TextConfig(paths=[str(bad)])), 0)
    bad.write_text('{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected a JSON object with a string field 'text'"):
        build_dataset(DataConfig(task="text", text=TextConfig(paths=[str(bad)])), 0)
    with pytest.raises(DataError, match="data file not found: .*missing.txt"):
        build_dataset(DataConfig(task="text", text=TextConfig(paths=[str(tmp_path / "missing.txt")])), 0)
    long = write_jsonl(tmp_path / "long.jsonl", ["short", "x" * 100])
    with pytest.raises(DataError, match=r"long.jsonl:2: a document of 100 tokens is longer than .* seq_len = 64"):
        build_dataset(DataConfig(task="text", seq_len=64, text=TextConfig(paths=[long], packing="varlen")), 0)
    with pytest.raises(ConfigError, match="needs data.text.paths"):
        build_dataset(DataConfig(task="text"), 0)


def test_hf_dataset_from_a_local_directory(tmp_path):
    pytest.importorskip("datasets", reason="the datasets package is not installed (optional)")
    write_jsonl(tmp_path / "train.jsonl", ["first document", "second document"])
    ds = build_dataset(DataConfig(task="text", seq_len=8, text=TextConfig(hf_dataset=str(tmp_path))), 0)
    assert [w for w, _ in ds.documents] == [f"{tmp_path}[0]", f"{tmp_path}[1]"]


def test_hugging_face_tokenizer_from_a_local_directory(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from dla.data import ByteTokenizer

    ByteTokenizer().save(tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", ["héllo wörld", "second"])
    text = TextConfig(paths=[path], tokenizer=str(tmp_path / "tok"))
    ds = build_dataset(DataConfig(task="text", seq_len=4, text=text), 0)
    assert ds.vocab_size == 257 and ds.tokenizer.eos_token_id == 256
    assert ds.documents[0][1].tolist() == ByteTokenizer().encode("héllo wörld") + [256]


@pytest.mark.parametrize("packing", ["varlen", "fixed"])
def test_streaming_packs_every_target_once_in_full_batches(tmp_path, packing):
    texts = ["a" * 30, "bb", "c" * 7, "d" * 50, "e"]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    cfg = DataConfig(task="text", seq_len=8, text=TextConfig(paths=[path], packing=packing, streaming=True))
    ds = build_dataset(cfg, 0)
    assert not hasattr(ds, "documents")  # nothing is read before a batch is asked for
    batches = [ds.batch(i, 3) for i in range(4)]
    targets = []
    for b in batches:
        assert b.num_tokens == 3 * 8
        if packing == "varlen":
            lengths = b.cu_seqlens.diff()
            assert b.input_ids.shape == (1, 24) and int(lengths.sum()) == 24 and int(lengths.max()) <= 8
            for s, e in zip(b.cu_seqlens[:-1].tolist(), b.cu_seqlens[1:].tolist()):  # targets are next inputs
                assert torch.equal(b.targets[0, s:e - 1], b.input_ids[0, s + 1:e])
        else:
            assert b.input_ids.shape == (3, 8)
        targets += b.targets.flatten().tolist()
    # every document's targets, in stream order, each once (the stream loops in epochs)
    stream = [t for text in texts for t in [ord(c) for c in text][1:] + [256]]
    assert targets[:len(stream)] == stream and targets[len(stream):] == stream[:96 - len(stream)]
    assert torch.equal(ds.batch(1, 3).input_ids, batches[1].input_ids)  # random access re-reads the stream
    assert torch.equal(build_dataset(cfg, 0).batch(3, 3).targets, batches[3].targets)


def test_streaming_a_hugging_face_dataset(tmp_path):
    pytest.importorskip("datasets", reason="the datasets package is not installed (optional)")
    path = write_jsonl(tmp_path / "train.jsonl", ["first document", "second document"])
    cfg = DataConfig(task="text", seq_len=16, text=TextConfig(hf_dataset="json", hf_data_files=[path],
                                                              packing="varlen", streaming=True))
    batch = build_dataset(cfg, 0).batch(0, 2)
    assert batch.cu_seqlens.tolist() == [0, 14, 29, 32]
    assert bytes(batch.input_ids[0, :14].tolist()) == b"first document"
