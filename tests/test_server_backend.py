"""LLM players on an inference server, against the scripted stub in tests/openai_stub.py.

None of these needs torch (a server player loads no model here), except the
comparison with the text the local backend renders, which is skipped without it.
"""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import openai_stub
import pandas as pd
import pytest
from conftest import ROOT, SCENARIOS
from openai_stub import FINGERPRINT, MODEL, Stub, serve

import abm.llm.server as server_module
import abm.policies.llm as llm_module
import abm.policies.llm_backends as llm_backends
from abm.errors import ScenarioError
from abm.run import main, run_scenario
from abm.scenario import validate_scenario

RULES = ["All-D", "All-C", "Defect Once", "Trigger", "Tit-for-tat"]
# The stub's model plays Tit-for-tat (C, then the opponent's last move); payoffs
# R=9, S=0, T=10, P=5, 5 rounds. Moves of the LLM / the rule, then the LLM's total:
# v All-D:       CDDDD / DDDDD -> S + 4*P = 20
# v All-C:       CCCCC / CCCCC -> 5*R = 45
# v Defect Once: CDCCC / DCCCC -> S + T + 3*R = 0 + 10 + 27 = 37
# v Trigger, v Tit-for-tat, v its own copy: all C -> 45
LLM_ROW = {"All-D": 20, "All-C": 45, "Defect Once": 37, "Trigger": 45, "Tit-for-tat": 45, "LLM": 45}
# The rules against it, from the same move strings (rule's total):
# All-D DDDDD v CDDDD -> T + 4*P = 30; All-C 45; Defect Once DCCCC v CDCCC -> T + S + 3*R = 37
LLM_COLUMN = {"All-D": 30, "All-C": 45, "Defect Once": 37, "Trigger": 45, "Tit-for-tat": 45}
# D counts of the LLM against each, from the same strings
LLM_DEFECTIONS = {"All-D": 4, "All-C": 0, "Defect Once": 1, "Trigger": 0, "Tit-for-tat": 0}


@pytest.fixture
def stub(monkeypatch):
    """A running stub server; retries wait 10 ms; no server connection outlives a test."""
    monkeypatch.setattr(server_module, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr(llm_backends, "_BACKENDS", {})
    stub = Stub()
    httpd = serve(stub)
    yield stub
    httpd.shutdown()
    httpd.server_close()


def scenario_text(url: str, llm: str, others: str | None = None, rounds: int = 5) -> str:
    players = (
        others
        if others is not None
        else (
            '{ name = "all_d", label = "All-D" }, { name = "all_c", label = "All-C" }, '
            '{ name = "defect_once", label = "Defect Once" }, '
            '{ name = "trigger", label = "Trigger" }, { name = "tit_for_tat", label = "Tit-for-tat" }, '
        )
    )
    return textwrap.dedent(f"""
        name = "server_test"
        seed = 5
        [game]
        R = 9
        S = 0
        T = 10
        P = 5
        [match]
        rounds = {rounds}
        [memory]
        scope = "match"
        [graph]
        kind = "complete"
        self_loops = {"true" if others is None else "false"}
        [population]
        players = [{players}{{ name = "llm", label = "LLM", server = "{url}", model = "{MODEL}", {llm} }}]
        [pairing]
        scheme = "all_edges"
        """)


def run(scenario_file, tmp_path, text):
    return run_scenario(scenario_file(text), out=tmp_path / "out", quiet=True)


def transcripts(out):
    return [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]


def assert_tit_for_tat_tables(out):
    payoff = pd.read_csv(out / "payoff_matrix.csv", index_col="player")
    defections = pd.read_csv(out / "defections.csv", index_col="player")
    for col, value in LLM_ROW.items():
        assert payoff.loc["LLM", col] == value, col
    for row, value in LLM_COLUMN.items():
        assert payoff.loc[row, "LLM"] == value, row
    for col, value in LLM_DEFECTIONS.items():
        assert defections.loc["LLM", col] == value, col


# ---------------------------------------------------------------- round robins


def test_score_mode_round_robin_reproduces_the_hand_computed_rows(stub, scenario_file, tmp_path):
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(stub.url, 'mode = "score", chat_template = "llama-2", reflection = true'),
    )
    assert_tit_for_tat_tables(out)
    records = transcripts(out)
    first = next(r for r in records if r["round"] == 1)
    # calm: C phrasings 0.7 (remain silent) + 0.1 (stay silent) + 4 * 0.001 (the other
    # four); D phrasings 0.1 (testify) + 3 * 0.001
    assert first["label_mass"] == pytest.approx(0.804 + 0.103)
    assert first["p_cooperate"] == pytest.approx(0.804 / 0.907)
    assert first["logprob_cooperate"] == pytest.approx(math.log(0.804))
    assert first["input"].startswith("[INST] ") and first["input"].endswith("Suspect1: I want to")
    # the prompt and phrasing went to /v1/completions with echo and logprobs
    scored = [b for path, _, b in stub.requests if path == "/v1/completions" and b.get("echo")]
    assert scored and all(b["logprobs"] == 1 and b["max_tokens"] == 1 for b in scored)
    # one request per phrasing: the police framing's ten after the first prompt (the
    # requests run concurrently, so they arrive in any order)
    assert sorted(b["prompt"][len(first["input"]) :] for b in scored[:10]) == sorted(
        [
            " remain silent",
            " stay silent",
            " keep silent",
            " remain quiet",
            " stay quiet",
            " keep quiet",
            " testify",
            " confess",
            " defect",
            " betray",
        ]
    )
    # reflections went through the same server, as completions of the rendered text
    assert all(r["reflection"] == openai_stub.REFLECTION for r in records)


def test_the_shipped_server_scenario_plays_the_seed_experiment(stub, scenario_file, tmp_path):
    text = (SCENARIOS / "round_robin_server.toml").read_text(encoding="utf-8")
    assert 'server = "http://127.0.0.1:8000/v1"' in text
    stub.model = "meta-llama/Llama-2-70b-chat-hf"
    out = run(scenario_file, tmp_path, text.replace("http://127.0.0.1:8000/v1", stub.url))
    assert_tit_for_tat_tables(out)
    assert {r["server_model"] for r in transcripts(out)} == {stub.model}


@pytest.mark.parametrize(
    ("usage", "shift"),
    [(False, 0), (True, 7)],
    ids=["offsets-without-usage", "usage-with-shifted-offsets"],
)
def test_score_mode_finds_the_phrasing_either_way(stub, scenario_file, tmp_path, usage, shift):
    # without usage.prompt_tokens the text offsets mark the prompt's end; with it,
    # offsets shifted by special tokens left out of the echoed text do not matter
    stub.usage, stub.offset_shift = usage, shift
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(
            stub.url, 'mode = "score", chat_template = "chatml"', others='"all_d", ', rounds=3
        ),
    )
    records = transcripts(out)
    assert [r["action"] for r in records] == list("CDD")
    # after a D: C phrasings 0.1 (remain silent) + 5 * 0.001, D 0.8 (testify) + 3 * 0.001
    assert records[1]["label_mass"] == pytest.approx(0.105 + 0.803)


def test_generate_mode_round_robin_uses_chat_completions(stub, scenario_file, tmp_path):
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(stub.url, 'mode = "generate", reflection = true, temperature = 0.0'),
    )
    assert_tit_for_tat_tables(out)
    paths = {path for path, _, _ in stub.requests}
    assert paths == {"/v1/chat/completions"}
    records = transcripts(out)
    # the server applies its chat template: the input is the messages themselves
    assert json.loads(records[0]["input"]) == records[0]["prompt"]
    assert all(r["reflection"] == openai_stub.REFLECTION for r in records)
    first = stub.requests[0][2]
    assert first["model"] == MODEL and first["temperature"] == 0.0 and first["max_tokens"] == 32


def test_transcripts_and_summary_name_what_the_server_ran(stub, scenario_file, tmp_path):
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(stub.url, 'mode = "generate"', others='"all_c", ', rounds=2),
    )
    for record in transcripts(out):
        assert record["server"] == stub.url
        assert record["server_model"] == MODEL
        assert record["system_fingerprint"] == FINGERPRINT
        assert record["revision"] == openai_stub.ROOT  # GET /v1/models names the weights
    summary = json.loads((out / "summary.json").read_text())
    server = summary["llm"][0]["server"]
    assert server["reported_models"] == [MODEL]
    assert server["system_fingerprints"] == [FINGERPRINT]
    assert server["listed"]["root"] == openai_stub.ROOT
    assert server["retries"] == 0


# ---------------------------------------------------------------- faults


def test_server_errors_are_retried(stub, scenario_file, tmp_path):
    stub.faults = ["500", "500"]
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(stub.url, 'mode = "generate"', others='"all_d", ', rounds=3),
    )
    assert [r["action"] for r in transcripts(out)] == list("CDD")
    # 3 decisions, the first tried three times
    assert len(stub.requests) == 5
    assert json.loads((out / "summary.json").read_text())["llm"][0]["server"]["retries"] == 2


def test_a_timeout_is_retried(stub, scenario_file, tmp_path):
    stub.faults = ["slow"]
    stub.slow_seconds = 2.0
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(
            stub.url, 'mode = "generate", server_timeout = 0.3', others='"all_d", ', rounds=2
        ),
    )
    assert [r["action"] for r in transcripts(out)] == list("CD")
    assert len(stub.requests) == 3
    assert json.loads((out / "summary.json").read_text())["llm"][0]["server"]["retries"] == 1


def test_malformed_json_is_retried_then_named(stub, scenario_file, tmp_path):
    stub.faults = ["malformed"]
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(stub.url, 'mode = "generate"', others='"all_d", ', rounds=2),
    )
    assert [r["action"] for r in transcripts(out)] == list("CD")
    stub.faults = ["malformed"] * 2
    text = scenario_text(
        stub.url, 'mode = "generate", server_retries = 1', others='"all_d", ', rounds=2
    )
    with pytest.raises(ScenarioError, match=r"after 2 tries \(last: an answer that is not JSON"):
        run_scenario(scenario_file(text, "again.toml"), out=tmp_path / "again", quiet=True)
    assert not (tmp_path / "again").exists()


def test_a_server_that_is_not_running_is_named(stub, scenario_file, tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    text = scenario_text(url, 'mode = "generate", server_retries = 1', others='"all_d", ')
    with pytest.raises(ScenarioError, match=r"did not answer GET /models after 2 tries .*refused"):
        run(scenario_file, tmp_path, text)


def test_a_client_error_is_shown_and_not_retried(stub, scenario_file, tmp_path):
    stub.faults = ["400"]
    text = scenario_text(stub.url, 'mode = "generate"', others='"all_d", ', rounds=2)
    with pytest.raises(ScenarioError, match="HTTP 400: max_tokens is too large"):
        run(scenario_file, tmp_path, text)
    assert len(stub.requests) == 1


def test_a_server_without_prompt_logprobs_is_a_clear_error(stub, scenario_file, capsys):
    stub.logprobs = False
    path = scenario_file(
        scenario_text(stub.url, 'mode = "score", chat_template = "chatml"', others='"all_d", ')
    )
    assert main([str(path), "--out", str(path.parent / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert stub.url in err and "no log-probabilities of the prompt" in err
    assert 'mode = "generate"' in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("dropped", "message"),
    [
        # as many entries as prompt tokens, but shifted: the last is the new token
        (1, r"echoed (\d+) tokens with log-probabilities for a prompt of \d+ tokens and one new"),
        (2, r"echoed (\d+) tokens with log-probabilities for a prompt of \d+ tokens and one new"),
    ],
)
def test_an_echo_that_does_not_line_up_is_refused(stub, scenario_file, tmp_path, dropped, message):
    stub.drop_first = dropped
    text = scenario_text(stub.url, 'mode = "score", chat_template = "chatml"', others='"all_d", ')
    with pytest.raises(ScenarioError, match=message):
        run(scenario_file, tmp_path, text)


def test_requests_run_concurrently(stub, scenario_file, tmp_path):
    # 5 rules and a self-play match: 7 LLM decisions a round; sampled answers are
    # never shared, so each is its own request
    stub.hold = 4
    run(
        scenario_file,
        tmp_path,
        scenario_text(
            stub.url, 'mode = "generate", temperature = 0.7, server_concurrency = 4', rounds=2
        ),
    )
    assert stub.max_in_flight == 4
    assert len(stub.requests) == 14


def test_a_request_that_fails_for_good_stops_the_others(stub, scenario_file, tmp_path):
    # the first prompt the server sees always gets HTTP 500; every other request
    # hangs until the test releases it (once the error has surfaced), then gets 500
    first: list[str] = []

    def fault_for(body):
        with stub.lock:
            first[:] = first or [body["prompt"]]
        return "500" if body["prompt"] == first[0] else "stall"

    stub.fault_for = fault_for
    stub.stall_seconds = 10.0  # a cap, so that a client that never gives up cannot hang
    concurrency, retries = 3, 2
    llm = (
        'mode = "score", chat_template = "chatml", '
        f"server_concurrency = {concurrency}, server_retries = {retries}"
    )
    try:
        with pytest.raises(ScenarioError, match=r"after 3 tries \(last: HTTP 500: engine"):
            run(scenario_file, tmp_path, scenario_text(stub.url, llm, others='"all_d", '))
    finally:
        stub.release.set()
    # wait until the requests in flight have ended: no request can start after that
    for backend in llm_backends._BACKENDS.values():
        backend._pool.shutdown(wait=True)
    prompts = [body["prompt"] for _, _, body in stub.requests]
    # round 1 is one prompt and its ten phrasings, 3 at a time: the failing phrasing
    # was tried 1 + retries = 3 times; each of the other 2 in flight sent its first
    # try, which hung until the error surfaced, and gave up instead of retrying;
    # the 7 waiting never started. Without stopping them the other two would have
    # been tried 3 times each: at least 3 + 2 * 3 = 9 requests
    assert prompts.count(first[0]) == retries + 1
    assert len(prompts) <= (retries + 1) + (concurrency - 1)
    assert len(set(prompts)) <= concurrency


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_sweep_s_workers_share_one_server(stub, scenario_file, tmp_path, backend):
    from abm.batch import load_sweep, run_sweep

    llm = 'mode = "score", chat_template = "llama-2"'
    scenario_file(scenario_text(stub.url, llm, rounds=2), "base.toml")
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 3\n[sweep]\ngame.noise = [0.0, 0.2]\n'
    )
    sweep = load_sweep(tmp_path / "sweep.toml")
    serial = run_sweep(sweep, tmp_path / "serial", backend="serial", report=False)
    asked_serially = len(stub.requests)
    if backend == "ray":
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        spread = run_sweep(sweep, tmp_path / backend, backend=backend, workers=2, report=False)
    finally:
        if backend == "ray":
            ray.shutdown()
    assert serial.ok and spread.ok, spread.errors
    # worker processes other than this one asked the one server, as often as it was
    # asked serially (no GPU, no model of their own)
    assert not any(w.endswith(f":{os.getpid()}") for w in spread.workers.values())
    assert len(stub.requests) == 2 * asked_serially > 0
    frames = [
        pd.read_parquet(tmp_path / name / "results.parquet")
        .drop(columns=["run_seconds"])
        .sort_values("run_id", ignore_index=True)
        for name in ("serial", backend)
    ]
    pd.testing.assert_frame_equal(*frames)
    assert (frames[1]["llm_decisions"] > 0).all()


# ---------------------------------------------------------------- the API key


def test_the_api_key_comes_from_the_environment_and_is_never_written(
    stub, scenario_file, tmp_path, monkeypatch
):
    secret = "sk-test-5f2c9e"
    monkeypatch.setenv("ABM_STUB_KEY", secret)
    out = run(
        scenario_file,
        tmp_path,
        scenario_text(
            stub.url,
            'mode = "generate", server_api_key_env = "ABM_STUB_KEY"',
            others='"all_d", ',
            rounds=2,
        ),
    )
    assert {auth for _, auth, _ in stub.requests} == {f"Bearer {secret}"}
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written
    for path in written:
        assert secret.encode() not in path.read_bytes(), path


def test_an_unset_api_key_variable_is_named(stub, scenario_file, tmp_path, monkeypatch):
    monkeypatch.delenv("ABM_STUB_KEY", raising=False)
    text = scenario_text(
        stub.url, 'mode = "generate", server_api_key_env = "ABM_STUB_KEY"', others='"all_d", '
    )
    with pytest.raises(ScenarioError, match="environment variable ABM_STUB_KEY"):
        run(scenario_file, tmp_path, text)
    assert stub.requests == []


def test_an_unserved_model_lists_the_served_ones(stub, scenario_file, tmp_path):
    text = scenario_text(stub.url, 'mode = "generate"', others='"all_d", ').replace(
        f'model = "{MODEL}"', 'model = "other"'
    )
    with pytest.raises(ScenarioError, match=f"does not serve the model 'other'.*'{MODEL}'"):
        run(scenario_file, tmp_path, text)


# ---------------------------------------------------------------- the scenario keys


def llm_table(**keys):
    return {
        "seed": 1,
        "graph": {"kind": "complete"},
        "population": {"players": [{"name": "llm", **keys}, "all_d"]},
    }


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"server": "http://h:1/v1", "model": "m"}, "needs a named chat_template"),
        ({"server": "http://h:1/v1", "mode": "generate"}, "needs model = the name"),
        ({"server_concurrency": 2}, "only applies to a model on an inference server"),
        ({"server": "ftp://h/v1", "model": "m", "mode": "generate"}, "not an http://"),
        ({"server": "http://u:k@h/v1", "model": "m", "mode": "generate"}, "no user, password"),
        (
            {"server": "http://h/v1", "model": "m", "mode": "generate", "dtype": "float16"},
            "dtype apply to a model abm loads and runs itself",
        ),
        (
            {
                "server": "http://h/v1",
                "model": "m",
                "mode": "generate",
                "server_api_key_env": "a b",
            },
            "is not the name of an environment variable",
        ),
    ],
)
def test_bad_server_keys_are_named(keys, message):
    with pytest.raises(ScenarioError, match=message):
        validate_scenario(llm_table(**keys), source="s.toml")


# ---------------------------------------------------------------- a core install


def test_a_server_player_runs_without_torch(stub, scenario_file, tmp_path):
    path = scenario_file(scenario_text(stub.url, 'mode = "generate"', others='"all_d", ', rounds=2))
    code = textwrap.dedent(f"""
        import sys
        sys.modules['torch'] = None
        sys.modules['transformers'] = None
        from abm.run import main
        status = main([{str(path)!r}, "--out", {str(tmp_path / "out")!r}, "--quiet"])
        assert status == 0, status
        assert 'torch' not in sys.modules or sys.modules['torch'] is None
        """)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["action"] for r in transcripts(tmp_path / "out")] == list("CD")


# ---------------------------------------------------------------- the prompt/phrasing boundary


def _echo_body(tokens, values, prompt_tokens=None):
    """A /completions answer echoing ``tokens`` (the last is the new token)."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    choice = {"logprobs": {"tokens": tokens, "token_logprobs": values, "text_offset": offsets}}
    body = {"choices": [choice]}
    if prompt_tokens is not None:
        body["usage"] = {"prompt_tokens": prompt_tokens}
    return body, choice


def _sum(tokens, values, prompt, tail, prompt_tokens=None):
    from types import SimpleNamespace

    body, choice = _echo_body(tokens, values, prompt_tokens)
    backend = SimpleNamespace(url="http://127.0.0.1:9/v1")
    return server_module.ServerBackend._continuation_logprob(backend, body, choice, prompt, tail)


def test_the_phrasing_s_own_tokens_are_summed():
    tokens = ["Answer", ":", " remain", " silent", " ."]
    values = [None, -0.5, -1.25, -0.75, -3.0]
    # the phrasing " remain silent" is the two tokens before the new one: -1.25 - 0.75
    assert _sum(tokens, values, "Answer:", " remain silent", prompt_tokens=4) == -2.0
    assert _sum(tokens, values, "Answer:", " remain silent") == -2.0  # from the offsets


def test_an_echo_one_short_of_the_counted_prompt_is_refused():
    # a server that counts a BOS it does not echo: index 4 would be the new token
    tokens = ["Answer", ":", " yes", "<|end|>"]
    with pytest.raises(ScenarioError, match="echoed 4 tokens .* a prompt of 4 tokens"):
        _sum(tokens, [None, -0.5, -2.0, -0.05], "Answer:", " yes", prompt_tokens=4)


def test_a_token_without_text_at_the_boundary_is_refused():
    # byte pieces of a multi-byte character come back without text: they cannot be
    # put on either side of the boundary, so nothing is guessed
    tokens = ["Answer", ":", "", "", "合", "作", " ."]
    values = [None, -0.5, -1.0, -1.1, -0.8, -1.0, -2.0]
    with pytest.raises(ScenarioError, match="token without text next to the phrasing"):
        _sum(tokens, values, "Answer:", "合作", prompt_tokens=6)


def test_a_token_joining_prompt_and_phrasing_is_refused():
    # the prompt ends in a space that merges with the phrasing's first letter
    tokens = ["Answer", ":", " A", " ."]
    with pytest.raises(ScenarioError, match="into one token"):
        _sum(tokens, [None, -0.5, -2.0, -1.0], "Answer: ", "A", prompt_tokens=3)


def test_the_api_key_does_not_follow_a_redirect(monkeypatch):
    import http.server
    import threading

    seen = {}

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen["auth"] = self.headers.get("Authorization")
            body = json.dumps({"data": [{"id": MODEL}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Other)
    target = f"http://localhost:{other.server_address[1]}"

    class Redirect(Other):
        def do_GET(self):  # noqa: N802
            seen["first"] = self.headers.get("Authorization")
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.end_headers()

    first = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for srv in (other, first):
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("ABM_TEST_KEY", "sk-secret")
        # building the backend asks the server which models it serves
        server_module.ServerBackend(
            f"http://127.0.0.1:{first.server_address[1]}/v1",
            MODEL,
            chat=True,
            api_key_env="ABM_TEST_KEY",
            retries=0,
        )
    finally:
        first.shutdown()
        other.shutdown()
    assert seen["first"] == "Bearer sk-secret"
    assert seen["auth"] is None  # the redirect's host never sees the key


def test_reflection_stop_is_refused_for_a_server_player():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="reflection_stop apply to a model abm loads"):
        llm_module.LLMParams(
            server="http://127.0.0.1:8000/v1", model="m", mode="generate", reflection_stop=["\n\n"]
        )


# ---------------------------------------------------------------- the BOS token

# a reflection after a retry: system, the decision, the answer, the reminder, the
# second answer and the reflection question (six messages, three user turns)
REFLECTION_CHAT = [
    {"role": "system", "content": "You are Suspect1."},
    {"role": "user", "content": "Police: Will you remain silent or testify?"},
    {"role": "assistant", "content": "Suspect1: I want to think"},
    {"role": "user", "content": "Police: Please answer with exactly one option."},
    {"role": "assistant", "content": "Suspect1: I want to remain silent"},
    {"role": "user", "content": "Police: They testified. Please reflect on your decision."},
]


def _local_render(messages, name):
    """What abm's local backend renders for a Llama tokenizer (BOS <s>, EOS </s>)."""
    pytest.importorskip("torch", reason="needs the llm extra (torch)")
    transformers = pytest.importorskip("transformers", reason="needs the llm extra")
    from tokenizers import Tokenizer, models

    from abm.llm.backend import Backend
    from abm.llm.chat_formats import NAMED

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]"))
    local = Backend.__new__(Backend)  # render needs the tokenizer only
    local.tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    return local.render(messages, "", NAMED[name])


@pytest.mark.parametrize("name", ["llama-2", "vicuna", "chatml"])
def test_the_server_text_is_the_local_text_less_the_leading_bos(stub, name):
    from abm.llm.chat_formats import NAMED

    server = server_module.ServerBackend(stub.url, MODEL, chat=False)
    local = _local_render(REFLECTION_CHAT, name)
    sent = server.render(REFLECTION_CHAT, "", NAMED[name])
    if name == "chatml":  # no BOS anywhere: the same text
        assert sent == local and "<s>" not in local
    else:
        assert sent == local.removeprefix("<s>") and local.startswith("<s>")
    if name == "llama-2":  # each of the three turns opens with a BOS; the server adds one
        assert local.count("<s>[INST]") == 3 and sent.count("</s><s>[INST] ") == 2
        assert sent.startswith("[INST] <<SYS>>\nYou are Suspect1.")
    if name == "vicuna":  # one BOS, at the start: nothing of it is left
        assert "<s>" not in sent and sent.count("</s>USER: ") == 2


@pytest.mark.parametrize("name", ["llama-2", "vicuna", "chatml"])
def test_reflections_reach_the_server_as_the_local_text(
    stub, scenario_file, tmp_path, monkeypatch, name
):
    from abm.llm.chat_formats import NAMED, render

    rendered = []
    real_render = server_module.ServerBackend.render

    def spy(self, messages, answer_prefix="", chat_template=None):
        text = real_render(self, messages, answer_prefix, chat_template)
        rendered.append((messages, answer_prefix, text))
        return text

    monkeypatch.setattr(server_module.ServerBackend, "render", spy)
    llm = f'mode = "score", chat_template = "{name}", reflection = true'
    run(scenario_file, tmp_path, scenario_text(stub.url, llm, others='"all_d", ', rounds=2))
    # in score mode only a reflection is rendered without an answer prefix
    reflections = [(m, text) for m, prefix, text in rendered if not prefix]
    assert len(reflections) == 2  # one a round
    sent = [body["prompt"] for _, _, body in stub.requests if not body.get("echo")]
    for messages, text in reflections:
        assert [m["role"] for m in messages][-3:] == ["user", "assistant", "user"]
        assert text in sent
        # the text a local model with a Llama tokenizer reads (chat_formats.render with
        # BOS <s> and EOS </s>, which equals apply_chat_template: test_chat_formats.py)
        local = render(NAMED[name], messages)
        if name == "chatml":
            assert text == local
        else:  # the server puts its BOS in front and reads what the local model reads
            assert stub.bos + text == local
    if name == "llama-2":
        assert all(text.count("</s><s>[INST] ") == 1 for _, text in reflections)


def test_a_template_file_with_a_bos_between_turns_is_refused(stub, scenario_file, tmp_path):
    # a Llama-2-like format whose BOS text abm cannot know: it opens every turn with one
    (tmp_path / "turns.jinja").write_text(
        "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    llm = 'mode = "score", chat_template = "turns.jinja"'
    with pytest.raises(ScenarioError, match=r"puts the BOS token \(bos_token\) after the start"):
        run(scenario_file, tmp_path, scenario_text(stub.url, llm, others='"all_d", '))
    # refused at the first prompt, a single turn, before any request
    assert stub.requests == []


def test_a_template_file_with_one_leading_bos_is_sent_without_it(stub, tmp_path):
    from abm.llm.chat_formats import chat_template, render

    (tmp_path / "lead.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    template = chat_template("lead.jinja", base=tmp_path)
    server = server_module.ServerBackend(stub.url, MODEL, chat=False)
    sent = server.render(REFLECTION_CHAT, "", template)
    assert sent == render(template, REFLECTION_CHAT, bos_token="[BOS]").removeprefix("[BOS]")
    assert sent.startswith("system: You are Suspect1.\nuser: ")


@pytest.mark.parametrize("bos", [None, "<s>"], ids=["no-bos", "server-bos"])
def test_score_mode_lines_up_whether_or_not_the_server_adds_a_bos(
    stub, scenario_file, tmp_path, bos
):
    # with a BOS the echo has one more token and usage.prompt_tokens counts it
    stub.bos = bos
    llm = 'mode = "score", chat_template = "llama-2"'
    out = run(scenario_file, tmp_path, scenario_text(stub.url, llm, others='"all_d", ', rounds=2))
    records = transcripts(out)
    assert [r["action"] for r in records] == list("CD")
    # calm, then after a D: as in the round robin's hand computations
    assert records[0]["label_mass"] == pytest.approx(0.804 + 0.103)
    assert records[1]["label_mass"] == pytest.approx(0.105 + 0.803)
