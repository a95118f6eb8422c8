"""One declaration of the sampling flags for ``offline``, ``generate`` and ``chat``: same names, same
defaults, the same SamplingParams from the same command line."""

import pytest

from gpu_worker.sampling_params import EarlyStopping, SamplingParams
from scheduler_svc.cli import build_parser
from scheduler_svc.sampling_flags import sampling_kwargs

COMMANDS = {
    "offline": ["offline", "--model", "m", "--prompt", "hi"],
    "generate": ["generate", "--prompt", "hi"],
    "chat": ["chat"],
}
COMMON = ["--max-tokens", "5", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--seed", "3", "--stop", "x",
          "--stop", "y", "--ignore-eos", "--min-tokens", "2", "--presence-penalty", "0.5", "--frequency-penalty",
          "-0.5", "--logit-bias", "4=1.5", "--logit-bias", "2=-100"]


def params_of(argv: list[str]) -> SamplingParams:
    return SamplingParams(**sampling_kwargs(build_parser().parse_args(argv)))


def test_every_command_has_the_same_defaults():
    """Nothing given: the engine's defaults (the server's), greedy in none of them."""
    defaults = {name: params_of([*argv, "--max-tokens", "5"]) for name, argv in COMMANDS.items()}
    assert set(defaults.values()) == {SamplingParams(max_tokens=5)}
    assert params_of(COMMANDS["chat"]).max_tokens == 512


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_the_same_flags_alike(command):
    got = params_of([*COMMANDS[command], *COMMON])
    assert got == SamplingParams(max_tokens=5, temperature=0.5, top_k=7, top_p=0.9, seed=3, stop=("x", "y"),
                                 ignore_eos=True, min_tokens=2, presence_penalty=0.5, frequency_penalty=-0.5,
                                 logit_bias={4: 1.5, 2: -100.0})


@pytest.mark.parametrize("command", ["offline", "generate"])
def test_several_completions_and_beams(command):
    argv = [*COMMANDS[command], "--max-tokens", "5", "--beam-width", "3", "--length-penalty", "0.5",
            "--early-stopping", "never"]
    got = params_of(argv)
    assert (got.beam_width, got.length_penalty, got.early_stopping) == (3, 0.5, EarlyStopping.NEVER)
    assert params_of([*COMMANDS[command], "--max-tokens", "5", "--n", "4"]).n == 4


def test_the_client_sdk_takes_the_same_keywords():
    pytest.importorskip("grpc")
    import clients  # noqa: F401
    from pagedserve.client import SamplingParams as ClientParams

    args = build_parser().parse_args([*COMMANDS["generate"], *COMMON, "--early-stopping", "true"])
    proto = ClientParams(**sampling_kwargs(args)).to_proto()
    assert (proto.max_tokens, proto.top_k, list(proto.stop), proto.early_stopping) == (5, 7, ["x", "y"],
                                                                                      EarlyStopping.ON_FULL.value)
    assert {b.token_id: b.bias for b in proto.logit_bias} == {4: 1.5, 2: -100.0}


@pytest.mark.parametrize("bad", ["4", "a=1", "4=x"])
def test_a_malformed_logit_bias_is_refused_by_argparse(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*COMMANDS["generate"], "--max-tokens", "5", "--logit-bias", bad])
    assert exc.value.code == 2 and f"argument --logit-bias: takes ID=BIAS, got {bad!r}" in capsys.readouterr().err
