"""Routing scores: the recorder sees the routers' real choices, counts only real tokens, changes nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from expert_hub.data import load_conversations, read_conversations, tokenize_conversation
from expert_hub.errors import InvalidInputError
from expert_hub.families import moe_layers
from expert_hub.models import load_base
from expert_hub.routing import RoutingRecorder, score_model, token_sequences
from expert_hub.scores import ExpertScores, scores_from_routing_logs

NORMALISED_TOP_K = {"deepseek_v3", "qwen3_moe", "mixtral", "gpt_oss"}  # top-k weights sum to 1 per token


def _sequences(tiny_models, family, esft_data, max_tokens=600):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[family])
    conversations = read_conversations(esft_data / "datasets/train/law.jsonl")
    return list(token_sequences(conversations, tokenizer, max_tokens=max_tokens, max_length=120))


def test_scores_sum_as_the_definitions_imply(tiny_models, family, esft_data):
    model = load_base(str(tiny_models[family]))
    sequences = _sequences(tiny_models, family, esft_data)
    scores = score_model(model, sequences, batch_size=3)
    total = sum(len(ids) for ids in sequences)
    assert total == 600
    assert sorted(scores.token_scores) == [layer.index for layer in moe_layers(model)]
    for layer, token_scores in scores.token_scores.items():
        assert scores.counts[layer].tokens == total
        assert sum(scores.counts[layer].selections) == total * 2
        assert math.isclose(sum(token_scores.values()), 1.0, rel_tol=1e-9)
        gate_total = sum(scores.gate_scores[layer].values())
        if family in NORMALISED_TOP_K:
            assert math.isclose(gate_total, 1.0, rel_tol=1e-5)
        else:
            assert 0 < gate_total < 1


def test_padding_is_not_counted(tiny_models, family, esft_data):
    """Batched (padded) scoring counts exactly what one-sequence-at-a-time scoring counts."""
    model = load_base(str(tiny_models[family]))
    sequences = _sequences(tiny_models, family, esft_data, max_tokens=300)
    assert len({len(ids) for ids in sequences}) > 1
    batched = score_model(model, sequences, batch_size=4)
    single = score_model(model, sequences, batch_size=1)
    for layer in single.counts:
        assert batched.counts[layer].selections == single.counts[layer].selections
        assert batched.counts[layer].tokens == single.counts[layer].tokens
        # The gates are float32: a padded batch may round differently in the last bit.
        torch.testing.assert_close(
            batched.counts[layer].gate_sums, single.counts[layer].gate_sums, rtol=1.3e-6, atol=1e-5
        )


def test_hooks_change_no_output(tiny_models, family):
    model = load_base(str(tiny_models[family])).eval()
    input_ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        plain = model(input_ids).logits
        with RoutingRecorder(model):
            hooked = model(input_ids).logits
        after = model(input_ids).logits
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert all(not layer.router._forward_hooks for layer in moe_layers(model))


def test_recorder_counts_the_routers_returned_choices_not_the_logits_argmax(tiny_models):
    """DeepSeek-V3 picks with a score bias and group limits, so its top-k is not the logits' top-k."""
    torch.manual_seed(0)
    model = load_base(str(tiny_models["deepseek_v3"])).eval()
    layer = moe_layers(model)[0]
    returned = []
    handle = layer.router.register_forward_hook(lambda m, i, out: returned.append((out[0], out[2])))
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        model(torch.randint(0, 256, (2, 64)))
    handle.remove()
    logits, indices = returned[0]
    assert recorder.selections[0].tolist() == torch.bincount(indices.flatten(), minlength=8).tolist()
    naive = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=8)
    assert naive.tolist() != recorder.selections[0].tolist()


def test_routing_logs_reproduce_the_published_scores(esft_data):
    scores = scores_from_routing_logs(esft_data / "routing_logs/law", top_k=6)
    published = json.loads((esft_data / "expert_scores/law/summary.json").read_text())
    assert sorted(scores.token_scores) == [1, 13, 26]
    for layer in scores.token_scores:
        assert scores.counts[layer].tokens == 8327
        for kind in ("token_scores", "gate_scores"):
            ours = getattr(scores, kind)[layer]
            assert {str(e): round(s, 4) for e, s in ours.items()} == published[kind][str(layer)]


def test_scores_round_trip_through_json(tmp_path, esft_data):
    scores = scores_from_routing_logs(esft_data / "routing_logs/law", top_k=6)
    scores.save(tmp_path / "scores.json")
    assert ExpertScores.load(tmp_path / "scores.json") == scores
    published = ExpertScores.load(esft_data / "expert_scores/law/summary.json")
    assert published.counts is None and len(published.token_scores) == 26


def test_bad_routing_log_line_is_reported_with_its_location(tmp_path):
    (tmp_path / "expert_weights_3.txt").write_text("1\t2\t\t0.5\t0.25\n1\t2\t3\t\t0.1\t0.2\t0.3\n")
    with pytest.raises(InvalidInputError, match=r"expert_weights_3.txt:2: 3 ids"):
        scores_from_routing_logs(tmp_path, top_k=2)
    with pytest.raises(InvalidInputError, match="no expert_weights"):
        scores_from_routing_logs(tmp_path / "missing", top_k=2)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "Expecting"),
        ('{"text": "hi"}', "messages"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "role"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content"),
    ],
)
def test_malformed_data_lines_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "ok"}]}\n\n' + line + "\n")
    with pytest.raises(InvalidInputError, match=rf"data.jsonl:3: .*{problem}"):
        list(read_conversations(path))


def test_reference_prompt_format_masks_everything_but_the_answers(tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A."},
    ]
    ids, labels = tokenize_conversation(messages, tokenizer)
    assert tokenizer.decode(ids) == "<bos>Be brief.\n\nUser: Q?\n\nAssistant: A.<eos>"
    assert labels[0] == tokenizer.bos_token_id  # the reference labels the BOS with itself
    answer = [i for i, label in zip(ids[1:], labels[1:]) if label != -100]
    assert tokenizer.decode(answer) == " A.<eos>"


def test_routing_logs_in_rank_folders_are_added_up(tmp_path, esft_data):
    """The reference writes rank_*/expert_weights_{layer}.txt; two ranks of the same log count twice."""
    for rank in ("rank_0", "rank_1"):
        (tmp_path / rank).mkdir()
        (tmp_path / rank / "expert_weights_13.txt").write_text(
            (esft_data / "routing_logs/law/expert_weights_13.txt").read_text()
        )
    doubled = scores_from_routing_logs(tmp_path, top_k=6)
    single = scores_from_routing_logs(esft_data / "routing_logs/law", top_k=6)
    assert doubled.counts[13].tokens == 2 * single.counts[13].tokens
    assert doubled.counts[13].selections == [2 * c for c in single.counts[13].selections]
    assert doubled.token_scores[13] == single.token_scores[13]


def test_a_sorted_file_is_sampled_from_the_whole_file_with_the_seed_recorded(run_cli, tiny_models, tmp_path):
    """The reference shuffles the training set with its seed before taking the tokens to score."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"])
    topics = ["alpha"] * 50 + ["omega"] * 50  # sorted by topic: file order would score only "alpha"
    path = tmp_path / "sorted.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"{t} {i}"}, {"role": "assistant", "content": t}]})
            + "\n"
            for i, t in enumerate(topics)
        )
    )

    def sample(seed):
        sequences = token_sequences(load_conversations(path, seed=seed), tokenizer, max_tokens=200, max_length=64)
        return [tokenizer.decode(ids) for ids in sequences]

    first = sample(5934875)
    assert any("alpha" in text for text in first) and any("omega" in text for text in first)
    assert sample(5934875) == first and sample(1) != first
    assert all("omega" not in text for text in sample(None))

    code, _, err = run_cli(
        "score", "--base", tiny_models["qwen3_moe"], "--data", path, "--tokens", 200, "--seed", 7, "-o", tmp_path / "s"
    )
    assert code == 0, err
    source = json.loads((tmp_path / "s").read_text())["source"]
    assert source["seed"] == 7 and source["tokens_scored"] == 200
    assert ExpertScores.load(tmp_path / "s").source == source
