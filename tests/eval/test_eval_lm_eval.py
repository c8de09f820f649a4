"""The lm-evaluation-harness model class (``tritlm.eval.lm_eval``) against lm-eval's own HFLM on the
same transformers folder: per-request log-likelihoods and is_greedy, rolling log-likelihoods,
greedy generation with stop strings, and a multiple-choice task's accuracy from a local jsonl."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched: local folders and files only
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402

from tritlm.data.tokenizer import HFTokenizer  # noqa: E402

CTX = 64  # the model's context: short, so that truncation and rolling windows are exercised
TOL = 1e-4

SENTENCES = [
    "the cat sat on the mat.", "a dog ran in the park.", "the sun is hot and the moon is cold.",
    "birds fly over the sea.", "we read a book at night.", "the red fox jumps over the lazy dog.",
    "rain falls on the green hills.", "she sings a song to the child.",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random LlamaForCausalLM with a byte-level BPE trained here: save_pretrained + tokenizer.json
    + tokenizer_config.json, the folder layout both tritlm's HF import and AutoTokenizer read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("lmeval") / "llama"
    tok = HFTokenizer.train_bpe(" ".join(SENTENCES) * 20, 320)  # <|endoftext|> = 0 is BOS and EOS
    torch.manual_seed(0)
    hc = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, initializer_range=0.15)
    LlamaForCausalLM(hc).eval().save_pretrained(d)
    tok.tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "model_max_length": CTX}))
    return d


@pytest.fixture(scope="module")
def hflm(hf_folder):
    import transformers
    from lm_eval.models.huggingface import HFLM

    transformers.logging.set_verbosity_error()
    return HFLM(pretrained=str(hf_folder), device="cpu", dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def ours(hf_folder):
    from tritlm.eval.lm_eval import TritlmLM

    return TritlmLM(path=str(hf_folder), batch_size=3)


def _reqs(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_ARGS = [
    ("the cat sat on the", " mat."),
    ("the cat sat on the", " park."),  # same context, other continuations: the one-forward cache
    ("the cat sat on the", " sea"),
    ("a dog ran in the ", "park."),  # trailing space moves to the continuation
    ("", "birds fly over the sea."),  # empty context: prefix token (BOS)
    ("we read", " a book at night. we read a book at night."),
    (" ".join(SENTENCES), " the red fox"),  # longer than the context: truncated from the left
    ("rain", " falls"),
]


def test_registered_and_lazy():
    import lm_eval.api.registry as reg

    import tritlm.eval.lm_eval as mod

    assert reg.get_model("tritlm") is mod.TritlmLM
    assert reg.get_model("hf").__name__ == "HFLM"  # lm-eval's own names still resolve


def test_loglikelihood_matches_hflm(hflm, ours):
    ref = hflm.loglikelihood(_reqs("loglikelihood", LL_ARGS), disable_tqdm=True)
    got = ours.loglikelihood(_reqs("loglikelihood", LL_ARGS), disable_tqdm=True)
    assert len(got) == len(ref) == len(LL_ARGS)
    diff = max(abs(a[0] - b[0]) for a, b in zip(got, ref))
    print(f"max |loglikelihood - HFLM| = {diff:.3g}")
    assert diff < TOL
    assert [g[1] for g in got] == [r[1] for r in ref]
    # a request scored on its own gives the same number as in a batch
    one = ours.loglikelihood(_reqs("loglikelihood", LL_ARGS[-1:]), disable_tqdm=True)
    assert abs(one[0][0] - got[-1][0]) < 1e-5


def test_loglikelihood_is_greedy_true_for_the_argmax_continuation(hflm, ours):
    ids = ours.tok_encode("the sun is hot")
    lp = torch.log_softmax(ours.lm.logits(ids)[-1], -1)
    best = ours.tokenizer.decode([int(lp.argmax())])
    req = _reqs("loglikelihood", [("the sun is hot", best)])
    got, ref = ours.loglikelihood(req, disable_tqdm=True), hflm.loglikelihood(req, disable_tqdm=True)
    if ours.tok_encode("the sun is hot" + best)[len(ids):] == [int(lp.argmax())]:
        assert got[0][1] is True
    assert got[0][1] == ref[0][1] and abs(got[0][0] - ref[0][0]) < TOL


def test_loglikelihood_rolling_matches_hflm(hflm, ours):
    docs = ["the cat sat on the mat.", " ".join(SENTENCES), " ".join(SENTENCES * 2) + " the end", "x"]
    n = [len(ours.tok_encode(d)) for d in docs]
    assert max(n) > 2 * CTX  # several windows
    ref = hflm.loglikelihood_rolling(_reqs("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    got = ours.loglikelihood_rolling(_reqs("loglikelihood_rolling", [(d,) for d in docs]), disable_tqdm=True)
    diff = max(abs(a - b) for a, b in zip(got, ref))
    print(f"max |rolling - HFLM| = {diff:.3g} over documents of {n} tokens")
    assert diff < TOL


def test_generate_until_matches_hflm_greedy(hflm, ours):
    prompts = ["the cat", "birds fly over", "we read a book"]
    free = [(p, {"until": [], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    ref_free = hflm.generate_until(_reqs("generate_until", free), disable_tqdm=True)
    got_free = ours.generate_until(_reqs("generate_until", free), disable_tqdm=True)
    assert got_free == ref_free
    # stop strings taken from the free generations: both must cut there
    stopped = []
    for p, text in zip(prompts, ref_free):
        assert len(text) >= 4
        stopped.append((p, {"until": [text[2:4]], "max_gen_toks": 12}))
    ref = hflm.generate_until(_reqs("generate_until", stopped), disable_tqdm=True)
    got = ours.generate_until(_reqs("generate_until", stopped), disable_tqdm=True)
    assert got == ref
    for g, (_, kw), full in zip(got, stopped, got_free):
        assert kw["until"][0] not in g and full.startswith(g) and len(g) <= 2


def _task(tmp_path):
    rows = [
        {"question": "the cat sat on the", "choices": ["mat.", "sea.", "moon."], "answer": 0},
        {"question": "birds fly over the", "choices": ["book.", "sea.", "child."], "answer": 1},
        {"question": "the sun is hot and the moon is", "choices": ["red.", "green.", "cold."], "answer": 2},
        {"question": "we read a book at", "choices": ["night.", "park.", "dog."], "answer": 0},
        {"question": "rain falls on the green", "choices": ["fox.", "hills.", "song."], "answer": 1},
        {"question": "she sings a song to the", "choices": ["mat.", "sun.", "child."], "answer": 2},
    ]
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tritlm_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks, len(rows)


def test_run_tasks_accuracy_matches_hflm(tmp_path, hf_folder, hflm):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tritlm.eval.lm_eval import run_tasks

    tasks, n = _task(tmp_path)
    got = run_tasks(hf_folder, ["tritlm_tiny_mc"], include_path=tasks, batch_size=2)
    ref = lm_eval.simple_evaluate(model=hflm, tasks=["tritlm_tiny_mc"], log_samples=False,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    a, b = got["results"]["tritlm_tiny_mc"], ref["results"]["tritlm_tiny_mc"]
    print(f"acc: tritlm {a['acc,none']} HFLM {b['acc,none']} over {n} documents")
    assert a["acc,none"] == b["acc,none"]
    assert got["n-samples"]["tritlm_tiny_mc"]["effective"] == n
    assert got["config"]["model"] == "tritlm" and "samples" not in got
    lim = run_tasks(hf_folder, "tritlm_tiny_mc", include_path=tasks, limit=2)
    assert lim["n-samples"]["tritlm_tiny_mc"]["effective"] == 2
    # per document and choice: the same (loglikelihood, is_greedy) as HFLM's
    from tritlm.eval.lm_eval import TritlmLM

    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    mine = lm_eval.simple_evaluate(model=TritlmLM(path=str(hf_folder), batch_size=4), tasks=["tritlm_tiny_mc"],
                                   task_manager=tm, bootstrap_iters=0)["samples"]["tritlm_tiny_mc"]
    theirs = lm_eval.simple_evaluate(model=hflm, tasks=["tritlm_tiny_mc"], task_manager=tm,
                                     bootstrap_iters=0)["samples"]["tritlm_tiny_mc"]
    pairs = [(x, y) for s, t in zip(mine, theirs) for x, y in zip(s["resps"], t["resps"])]
    assert len(pairs) == 3 * n
    assert max(abs(x[0][0] - y[0][0]) for x, y in pairs) < TOL and all(x[0][1] == y[0][1] for x, y in pairs)


def test_packed_model_batched_equals_single(tmp_path, hf_folder):
    """A packed folder (the runtime Transformer on the C kernels): batched forwards give the
    numbers of the engine's own one-sequence logits, and generation runs through the engine."""
    import tritlm
    from tritlm.eval.lm_eval import TritlmLM
    from tritlm.formats.packed import from_transformer, save_packed
    from tritlm.formats.ptq import quantize_model

    m = tritlm.load(hf_folder)
    q = quantize_model(m.model, "ternary")  # ternary layers with int8 activations: the C kernels run
    p = save_packed(from_transformer(q, m.tokenizer, fp_dtype="fp32"), tmp_path / "packed")
    lm = TritlmLM(path=str(p), batch_size=4)
    assert lm.lm.engine is not None and lm.max_length == CTX
    got = lm.loglikelihood(_reqs("loglikelihood", LL_ARGS), disable_tqdm=True)
    for (ctx, cont), (ll, _) in zip(LL_ARGS, got):
        c, k = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
        whole = (c + k)[-(CTX + 1):]
        lp = torch.log_softmax(lm.lm.logits(whole[:-1]).double(), -1)[-len(k):]
        assert abs(ll - float(lp.gather(1, torch.tensor(k).view(-1, 1)).sum())) < TOL
    out = lm.generate_until(_reqs("generate_until", [("the cat", {"until": [], "max_gen_toks": 6})]),
                            disable_tqdm=True)
    assert out == [lm.lm.generate("the cat", max_tokens=6, temperature=0.0)]


@pytest.mark.slow  # ~20 s on 2 cores: lm-eval's CLI always indexes its own ~15k task names (~13 s)
def test_command_line_runs_lm_evals_cli_with_the_model(tmp_path, hf_folder):
    """``python -m tritlm.eval.lm_eval`` is lm-eval's own CLI with ``--model tritlm`` registered."""
    import subprocess
    import sys

    tasks, n = _task(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "tritlm.eval.lm_eval", "run", "--model", "tritlm",
                        "--model_args", f"path={hf_folder},max_length=48", "--tasks", "tritlm_tiny_mc",
                        "--include_path", str(tasks), "--output_path", str(tmp_path / "out"), "--batch_size", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results_*.json")]
    assert len(res) == 1
    from tritlm.eval.lm_eval import run_tasks

    ref = run_tasks(hf_folder, ["tritlm_tiny_mc"], include_path=tasks, max_length=48)
    assert res[0]["results"]["tritlm_tiny_mc"]["acc,none"] == ref["results"]["tritlm_tiny_mc"]["acc,none"]
    assert res[0]["n-samples"]["tritlm_tiny_mc"]["effective"] == n
    assert res[0]["config"]["model"] == "tritlm" and res[0]["config"]["max_length"] == 48
    assert "tritlm_tiny_mc" in r.stdout


def test_sampling_options_context_cap_and_prefix_errors(hf_folder, ours):
    import tritlm
    from tritlm.api import LoadedModel
    from tritlm.data.tokenizer import CharTokenizer
    from tritlm.eval.lm_eval import TritlmLM

    kw = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.5, "top_k": 20}
    a = ours.generate_until(_reqs("generate_until", [("the cat", kw)]), disable_tqdm=True)
    b = ours.generate_until(_reqs("generate_until", [("the cat", kw)]), disable_tqdm=True)
    greedy = ours.generate_until(_reqs("generate_until", [("the cat", {"until": [], "max_gen_toks": 8})]),
                                 disable_tqdm=True)
    assert a == b and a != greedy  # seeded sampling: reproducible, and not the greedy text
    with pytest.raises(ValueError, match="no room"):
        ours.generate_until(_reqs("generate_until", [("the cat", {"max_gen_toks": CTX})]), disable_tqdm=True)
    m = tritlm.load(hf_folder)
    capped = TritlmLM(model=m, max_length=10 * CTX, batch_size="auto")
    assert capped.max_length == CTX and capped.batch_size == 8
    # a char tokenizer has neither BOS nor EOS: empty contexts need prefix_token_id
    ct = CharTokenizer.from_text("abc def.")
    char = TritlmLM(model=LoadedModel(m.model, ct, hf_folder, "hf"))
    with pytest.raises(ValueError, match="prefix_token_id"):
        char.loglikelihood(_reqs("loglikelihood", [("", "abc")]), disable_tqdm=True)
    got = TritlmLM(model=LoadedModel(m.model, ct, hf_folder, "hf"), prefix_token_id=0).loglikelihood(
        _reqs("loglikelihood", [("", "abc"), ("ab", "c")]), disable_tqdm=True)
    lp = torch.log_softmax(m.logits([0] + ct.encode("ab")).double(), -1)
    want = sum(float(lp[i, t]) for i, t in enumerate(ct.encode("abc")))
    lp2 = torch.log_softmax(m.logits(ct.encode("ab")).double(), -1)  # a context: no prefix token
    assert abs(got[0][0] - want) < TOL and abs(got[1][0] - float(lp2[1, ct.encode("c")[0]])) < TOL


def test_shared_forward_scores_each_request_at_its_own_positions(ours):
    """Requests whose context + continuation[:-1] are the same tokens share one forward even when
    split differently; each continuation is read from the trailing positions of that forward."""
    reqs = [(None, [5, 6], [7]), (None, [5], [6, 8]), (None, [5, 6], [9]), (None, [5, 6, 7], [4, 3])]
    got = ours._loglikelihood_tokens(reqs, disable_tqdm=True)
    for (_, ctx, cont), (ll, greedy) in zip(reqs, got):
        lp = torch.log_softmax(ours.lm.logits(ctx + cont[:-1]).double(), -1)[-len(cont):]
        want = float(lp.gather(1, torch.tensor(cont).view(-1, 1)).sum())
        assert abs(ll - want) < 1e-5
        assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
