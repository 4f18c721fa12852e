"""Stop strings across deltas, incremental detokenization, token bytes, block splitting, settings parsing."""

from __future__ import annotations

from gateway.embedded import split_blocks
from gateway.generation.stops import StopMatcher
from gateway.generation.token_text import TokenText
from gateway.generation.tokenization import IncrementalDetokenizer
from gateway.settings import GatewaySettings


def test_stop_split_across_deltas_is_held_back_then_cut():
    m = StopMatcher(["END"])
    assert m.push("hello E") == "hello "
    assert m.push("N") == ""
    assert m.push("D and more") == "" and m.stopped


def test_false_alarm_prefix_is_released():
    m = StopMatcher(["END", "###"])
    assert m.push("a #") == "a "
    assert m.push("#x") == "##x"
    assert m.push("EN") == ""
    assert m.flush() == "EN"


def test_earliest_stop_wins():
    m = StopMatcher(["b", "abc"])
    assert m.push("xxabcb") == "xx" and m.stopped  # "abc" starts before "b"


def test_incremental_detokenizer_matches_full_decode(tokenizer):
    text = "Héllo wörld! 日本語のテキスト 🙂 done."
    prompt = tokenizer("Say:", add_special_tokens=False)["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    out = "".join(detok.push(t) for t in ids) + detok.flush()
    assert out == tokenizer.decode(ids)
    assert "\ufffd" not in out


def test_token_text_bytes_reassemble_utf8(tokenizer):
    tt = TokenText(tokenizer)
    ids = tokenizer("🙂 ok", add_special_tokens=False)["input_ids"]
    raw = b"".join(bytes(tt.get(t)[1]) for t in ids)
    assert raw.decode("utf-8") == "🙂 ok"


def test_split_blocks():
    assert split_blocks(30, 2) == [(0, 15), (15, 30)]
    assert split_blocks(30, 4) == [(0, 8), (8, 15), (15, 22), (22, 30)]
    assert split_blocks(2, 5) == [(0, 1), (1, 2)]


def test_settings_lists_from_env(monkeypatch):
    monkeypatch.setenv("PETALS_GATEWAY_API_KEYS", "k1, k2")
    monkeypatch.setenv("PETALS_GATEWAY_INITIAL_PEERS", '["/ip4/1.2.3.4/tcp/1/p2p/Qm"]')
    s = GatewaySettings()
    assert s.api_keys == ["k1", "k2"] and s.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/Qm"]
    assert GatewaySettings(api_keys=["x"]).api_keys == ["x"]
