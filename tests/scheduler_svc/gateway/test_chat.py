"""Chat templates render exactly as transformers' apply_chat_template renders them (text and token ids),
from each place a checkpoint keeps its template; a model without one is refused with
FAILED_PRECONDITION, a conversation the template refuses with INVALID_ARGUMENT on ``messages``."""

import asyncio
import json
import shutil

import grpc
import pytest
from transformers import AutoTokenizer

import clients  # noqa: F401

# isort: split
from gpu_worker.demo_model import TRAINED_GGUF, trained_gguf_path
from gpu_worker.sampling_params import InvalidField
from pagedserve.internal.v1 import scheduler_pb2
from pagedserve.v1 import generation_pb2
from scheduler_svc.gateway.chat import CHAT_TEMPLATE_FILE, ChatPrompts, ChatTemplate
from scheduler_svc.gateway.generation import GenerationFailed
from scheduler_svc.gateway.tokenizer import Tokenizer
from scheduler_svc.gateway.validation import ModelLimits
from tests.factories import make_checkpoint

# ChatML, the format of SmolLM2 and Qwen: a default system turn when the conversation has none.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: the BOS token by name, headers per turn, trimmed content, roles checked with
# raise_exception, a loop control, and whitespace control.
LLAMA3_STYLE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ('system', 'user', 'assistant') %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- if message['content'] == '' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is a block table? café 日本語"},
    {"role": "assistant", "content": "  A map from a sequence's blocks to physical blocks.  "},
    {"role": "user", "content": ""},
    {"role": "user", "content": "And copy-on-write?"},
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")


def with_template(base_dir, tmp_path, template: str, where: str):
    """A copy of the checkpoint whose template is in chat_template.jinja or tokenizer_config.json."""
    path = tmp_path / "model"
    shutil.copytree(base_dir, path)
    if where == "jinja":
        (path / CHAT_TEMPLATE_FILE).write_text(template)
    else:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template if where == "config" else [
            {"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def assert_like_transformers(path, messages):
    tokenizer = Tokenizer(path)
    ours = ChatTemplate.from_model(path, tokenizer.id_to_token)
    hf = AutoTokenizer.from_pretrained(path)
    want_text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours.render(messages) == want_text
    assert tokenizer.encode(ours.render(messages), add_special_tokens=False) == want_ids
    return want_text


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("where", ["jinja", "config", "named"])
def test_renders_like_transformers(base_dir, tmp_path, template, where):
    source = CHATML if template == "chatml" else LLAMA3_STYLE
    text = assert_like_transformers(with_template(base_dir, tmp_path, source, where), CONVERSATION)
    if template == "chatml":
        assert text.endswith("<|im_start|>user\nAnd copy-on-write?<|im_end|>\n<|im_start|>assistant\n")
        assert "You are a helpful assistant" not in text  # the conversation brings its own system turn
    else:
        assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nYou answer")
        assert "physical blocks.<|eot_id|>" in text  # trimmed


def test_first_turn_without_system_and_the_bos_token(base_dir, tmp_path):
    text = assert_like_transformers(with_template(base_dir, tmp_path, CHATML, "jinja"), CONVERSATION[1:2])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")


def test_chat_template_file_wins_over_tokenizer_config(base_dir, tmp_path):
    path = with_template(base_dir, tmp_path, LLAMA3_STYLE, "config")
    (path / CHAT_TEMPLATE_FILE).write_text(CHATML)
    assert_like_transformers(path, CONVERSATION)
    assert ChatTemplate.from_model(path, Tokenizer(path).id_to_token).source == CHATML


def test_template_errors_name_messages(base_dir, tmp_path):
    path = with_template(base_dir, tmp_path, LLAMA3_STYLE, "jinja")
    template = ChatTemplate.from_model(path, Tokenizer(path).id_to_token)
    with pytest.raises(InvalidField, match="unknown role tool") as err:
        template.render([{"role": "tool", "content": "42"}])
    assert err.value.field == "messages"


class _Core:
    """What ChatPrompts reads from GenerationCore."""

    def __init__(self, path):
        self.model_name = "demo"
        self.tokenizer = Tokenizer(path)
        self.limits = ModelLimits("demo", self.tokenizer.vocab_size, 256)

    async def encode(self, text, add_special_tokens=True):
        return self.tokenizer.encode(text, add_special_tokens)


def prompt_token_ids(prompts: ChatPrompts, messages) -> list[int]:
    """The prompt of the GenerateRequest a conversation becomes (what the gateway sends upstream)."""
    request = asyncio.run(prompts.request("r", "demo", messages, generation_pb2.SamplingParams()))
    return list(request.token_ids.ids)


def test_model_without_template_is_a_failed_precondition(base_dir):
    assert ChatTemplate.from_model(base_dir, Tokenizer(base_dir).id_to_token) is None
    with pytest.raises(GenerationFailed) as err:
        prompt_token_ids(ChatPrompts(_Core(base_dir), None), CONVERSATION)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "no chat template" in err.value.message


def test_chat_prompts_checks_messages_and_length(base_dir, tmp_path):
    path = with_template(base_dir, tmp_path, CHATML, "jinja")
    core = _Core(path)
    prompts = ChatPrompts(core, ChatTemplate.from_model(path, core.tokenizer.id_to_token))
    ids = prompt_token_ids(prompts, CONVERSATION[1:2])
    hf = AutoTokenizer.from_pretrained(path)
    assert ids == hf.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True)["input_ids"]
    for messages, field in (([], "messages"), ([{"role": "user"}], "messages[0].content"),
                            (CONVERSATION * 4, "messages")):  # over 256 tokens
        with pytest.raises(GenerationFailed) as err:
            prompt_token_ids(prompts, messages)
        assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, field)


def test_a_conversation_too_long_for_any_prompt_is_refused_before_tokenizing(base_dir, tmp_path, monkeypatch):
    path = with_template(base_dir, tmp_path, CHATML, "jinja")
    core = _Core(path)
    prompts = ChatPrompts(core, ChatTemplate.from_model(path, core.tokenizer.id_to_token))
    calls = []
    monkeypatch.setattr(core, "encode", lambda *args, **kwargs: calls.append(args))
    with pytest.raises(GenerationFailed) as err:
        asyncio.run(prompts.request("r", "demo", [{"role": "user", "content": "x" * (2**20 + 1)}],
                                    generation_pb2.SamplingParams(max_tokens=1)))
    assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "messages")
    assert "the limit is 1048576 bytes (--max-prompt-bytes)" in err.value.message and calls == []


def test_chat_request_becomes_a_generate_request(base_dir, tmp_path):
    path = with_template(base_dir, tmp_path, CHATML, "jinja")
    core = _Core(path)
    prompts = ChatPrompts(core, ChatTemplate.from_model(path, core.tokenizer.id_to_token))
    chat = generation_pb2.ChatRequest(request_id="r1", model="demo",
                                      sampling_params=generation_pb2.SamplingParams(max_tokens=3))
    chat.messages.add(role="user", content="hello")
    request = asyncio.run(prompts.from_proto(chat))
    assert (request.request_id, request.model, request.sampling_params.max_tokens) == ("r1", "demo", 3)
    assert list(request.token_ids.ids) == prompt_token_ids(prompts, [{"role": "user", "content": "hello"}])
    chat.ClearField("sampling_params")
    assert not asyncio.run(prompts.from_proto(chat)).HasField("sampling_params")


@pytest.mark.slow
def test_smollm2_gguf_template_like_transformers():
    try:
        gguf_file = trained_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tokenizer = Tokenizer(gguf_file)
    ours = ChatTemplate.from_model(gguf_file, tokenizer.id_to_token)
    hf = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=TRAINED_GGUF)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render(messages) == want
        assert tokenizer.encode(want, add_special_tokens=False) == hf.apply_chat_template(
            messages, add_generation_prompt=True)["input_ids"]
    # Named as the file's metadata names them by id. (transformers' GGUF conversion names the BOS token
    # <|im_start|> as eos_token too; SmolLM2's template names neither.)
    assert ours.special_tokens == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
                                   "pad_token": "<|im_end|>"}


def test_chat_rpc_streams_the_reply_and_python_client_sends_early_stopping(base_dir, tmp_path):
    from pagedserve.client import GenerationError, SamplingParams
    from tests.scheduler_svc.gateway.test_openai_http import FakeScheduler
    from tests.scheduler_svc.gateway.test_server import TEXT, one_token_per_step, running

    path = with_template(base_dir, tmp_path, CHATML, "jinja")
    fake = FakeScheduler(one_token_per_step(Tokenizer(path)))
    want_ids = AutoTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION, add_generation_prompt=True)

    async def scenario():
        async with running(path, fake) as (client, _, _):
            params = SamplingParams(max_tokens=50, early_stopping="never")  # passed on as is (used by beams)
            chunks = [c async for c in client.chat([(m["role"], m["content"]) for m in CONVERSATION], params)]
            assert "".join(c.text for c in chunks) == TEXT and chunks[-1].finish_reason == "length"
            (submit,) = fake.submits
            assert list(submit.prompt_token_ids) == want_ids["input_ids"]
            assert submit.sampling_params.early_stopping == scheduler_pb2.EARLY_STOPPING_NEVER
            with pytest.raises(GenerationError) as err:
                [c async for c in client.chat([{"role": "user", "content": "x"}] * 200, params)]
            assert (err.value.code, err.value.field) == (grpc.StatusCode.INVALID_ARGUMENT, "messages")
        async with running(base_dir, fake) as (client, _, _):
            with pytest.raises(GenerationError) as err:
                [c async for c in client.chat(CONVERSATION, SamplingParams(max_tokens=5))]
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(scenario())
