"""The official `openai` client against a real `kiln serve` with LLMs.

Two tiny random models from fixtures/llm: "llama" (the transformers folder
tiny-llama3: Llama 3 chat template, sharded safetensors, llama3 rope scaling)
and "qwen-gguf" (tiny-qwen2 as an f32 GGUF file). Greedy outputs are checked
against transformers' recorded greedy continuations (fixtures/llm/*/reference).
"""

from __future__ import annotations

import json
import time

import openai
import pytest
import requests

from conftest import API_KEY, REPO_ROOT

LLM_FIXTURES = REPO_ROOT / "fixtures" / "llm"


def reference_case(model: str, name: str) -> dict:
    index = json.loads((LLM_FIXTURES / model / "reference" / "index.json").read_text())
    return next(c for c in index["cases"] if c["name"] == name)


@pytest.fixture(scope="module")
def llm_server(kiln_serve):
    return kiln_serve(
        name="llm",
        models=[
            {"name": "llama", "source": str(LLM_FIXTURES / "tiny-llama3"), "concurrency": 1},
            {
                "name": "qwen-gguf",
                "source": str(LLM_FIXTURES / "tiny-qwen2" / "gguf" / "model-f32.gguf"),
                "concurrency": 1,
            },
        ],
    )


@pytest.fixture(scope="module")
def client(llm_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm_server.base_url}/v1", api_key=API_KEY, max_retries=0)


def test_models_list_has_both_llms(client):
    ids = {m.id for m in client.models.list().data}
    assert {"llama", "qwen-gguf"} <= ids


def test_greedy_chat_is_transformers_greedy_continuation(client):
    case = reference_case("tiny-llama3", "chat")
    reply = client.chat.completions.create(
        model="llama",
        messages=case["messages"],
        temperature=0,
        max_tokens=len(case["output_ids_list"]),
        extra_body={"ignore_eos": True},
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == case["output_text"]
    assert choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == case["n_prompt_tokens"]
    assert reply.usage.completion_tokens == len(case["output_ids_list"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")


def test_greedy_completion_from_gguf_matches_transformers(client):
    case = reference_case("tiny-qwen2", "short")
    reply = client.completions.create(
        model="qwen-gguf",
        prompt=case["prompt"],
        temperature=0,
        max_tokens=len(case["output_ids_list"]),
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == case["output_text"]
    assert reply.usage.prompt_tokens == case["n_prompt_tokens"]
    assert reply.object == "text_completion"


def test_streamed_chat_equals_whole_answer_and_reports_usage(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(
        model="llama", messages=messages, temperature=0, max_tokens=20,
        extra_body={"ignore_eos": True},
    )
    chunks = list(client.chat.completions.create(
        model="llama", messages=messages, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_equals_whole_answer(client):
    whole = client.completions.create(model="qwen-gguf", prompt="Once upon", temperature=0, max_tokens=16)
    stream = client.completions.create(model="qwen-gguf", prompt="Once upon", temperature=0, max_tokens=16, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_logprobs_are_log_softmax_of_the_logits(client):
    reply = client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "Hi"}], temperature=0,
        max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_use_the_legacy_shape(client):
    reply = client.completions.create(model="qwen-gguf", prompt="The", temperature=0, max_tokens=4,
                                      logprobs=2, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_stop_string_ends_generation_and_is_not_returned(client):
    case = reference_case("tiny-qwen2", "short")
    full = case["output_text"]  # "========(((("
    stop = "(("
    reply = client.completions.create(model="qwen-gguf", prompt=case["prompt"], temperature=0,
                                      max_tokens=12, stop=[stop], extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_and_seeded_sampling_reproduce(client):
    args = dict(model="llama", messages=[{"role": "user", "content": "Pick a word."}],
                temperature=1.0, max_tokens=10, n=2, seed=1234, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**args)
    second = client.chat.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    other = client.chat.completions.create(**{**args, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]
    assert first.usage.completion_tokens == 20


def test_wrong_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"n": 0}, "n"),
    ],
)
def test_bad_parameters_are_bad_requests_naming_the_parameter(client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}], **extra)
    assert caught.value.body["param"] == param
    assert param in caught.value.body["message"]


def test_unknown_role_names_the_message_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama", messages=[{"role": "robot", "content": "beep"}])
    assert caught.value.body["param"] == "messages[0].role"


def test_prompt_longer_than_the_context_gives_both_numbers(client):
    long_prompt = "word " * 600
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="qwen-gguf", prompt=long_prompt, max_tokens=10)
    message = caught.value.body["message"]
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "512" in message and "prompt tokens" in message


def test_error_envelope_has_all_four_keys(llm_server):
    r = requests.post(f"{llm_server.base_url}/v1/chat/completions", headers=llm_server.auth_headers,
                      json={"model": "llama", "messages": "not a list"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_client_that_disconnects_mid_stream_frees_the_model(llm_server, client):
    with requests.post(
        f"{llm_server.base_url}/v1/completions", headers=llm_server.auth_headers, stream=True,
        json={"model": "llama", "prompt": "Go on", "max_tokens": 480, "stream": True,
              "ignore_eos": True, "temperature": 0},
        timeout=30,
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))
    # The next request (the model runs one sequence at a time) is served.
    started = time.monotonic()
    reply = client.completions.create(model="llama", prompt="Again", max_tokens=4, temperature=0)
    assert reply.choices[0].text is not None
    assert time.monotonic() - started < 30


def test_sagemaker_invocations_take_a_chat_body(llm_server):
    case = reference_case("tiny-llama3", "chat")
    r = requests.post(
        f"{llm_server.base_url}/invocations",
        headers={**llm_server.auth_headers, "X-Kiln-Model": "llama"},
        json={"messages": case["messages"], "temperature": 0, "max_tokens": 12, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == case["output_text"]


def test_kserve_v2_text_input_gives_text_output(llm_server):
    import numpy as np
    import tritonclient.http as triton

    case = reference_case("tiny-qwen2", "short")
    client = triton.InferenceServerClient(llm_server.base_url.removeprefix("http://"))
    text = triton.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([case["prompt"].encode()], dtype=object))
    max_tokens = triton.InferInput("max_tokens", [1], "INT64")
    max_tokens.set_data_from_numpy(np.array([12], dtype=np.int64))
    temperature = triton.InferInput("temperature", [1], "FP64")
    temperature.set_data_from_numpy(np.array([0.0]))
    raw = triton.InferInput("template", [1], "BOOL")  # plain text, no chat template
    raw.set_data_from_numpy(np.array([False]))
    result = client.infer("qwen-gguf", [text, max_tokens, temperature, raw], headers=llm_server.auth_headers,
                          outputs=[triton.InferRequestedOutput("text_output", binary_data=False)])
    out = result.as_numpy("text_output")
    assert out.shape == (1,)
    generated = out[0].decode() if isinstance(out[0], bytes) else out[0]
    # The model may reach EOS first; what it says is transformers' greedy text.
    assert case["output_text"].startswith(generated) and generated


def test_models_retrieve_and_unknown_routes_speak_openai(client, llm_server):
    model = client.models.retrieve("qwen-gguf")
    assert (model.id, model.object, model.owned_by) == ("qwen-gguf", "model", "kiln")
    r = requests.get(f"{llm_server.base_url}/v1/embeddings-typo", headers=llm_server.auth_headers)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
