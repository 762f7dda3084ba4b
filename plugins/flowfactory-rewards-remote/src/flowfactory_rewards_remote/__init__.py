"""Rewards scored in another process or machine.

- `ff reward serve --reward NAME ...` serves any installed reward over HTTP (docs/reward-server.md).
- `remote`: the client of that server.
- `vlm-judge`: a vision-language judge behind any OpenAI-compatible chat-completions endpoint (vLLM, SGLang).
- `flow-grpo-remote`: the client of Flow-GRPO's reward servers (DeQA, GenEval, UnifiedReward), whose replies are
  read by a reader that cannot run code.

This module imports pydantic and flowfactory only; requests, torch, starlette and uvicorn are imported when a
reward is built or the server starts, so `ff --help` and `ff list` stay fast.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowfactory import hookimpl

__version__ = "0.1.0"


def _check_url(value: str, key: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{key} must start with http:// or https://, e.g. http://127.0.0.1:8000")
    return value.rstrip("/")


class _ClientOptions(BaseModel):
    """What every HTTP client reward shares: time limits, retries, concurrency."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    timeout: float = Field(60.0, gt=0, description="Seconds one HTTP request may take before it counts as failed.")
    retries: int = Field(2, ge=0, le=20, description=(
        "Extra attempts of a request that failed on the network, timed out, or got a 5xx answer; 4xx answers "
        "are not retried."))
    backoff: float = Field(0.5, ge=0, description=(
        "Seconds before the first retry; each further retry waits twice as long as the one before."))
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")


class RemoteOptions(_ClientOptions):
    url: str = Field(description="Base URL of an `ff reward serve` server, e.g. http://127.0.0.1:8000.")
    reward: str = Field(description=(
        "Name of the reward the server must serve (checked against its GET /rewards when the run starts)."))
    batch_size: int = Field(16, ge=1, description=(
        "Images per request; a batch is split into requests sent concurrently. For a groupwise reward whole "
        "groups go in one request, so a request can hold more when a group is larger."))
    token_env: str | None = Field(None, description=(
        "Name of the environment variable holding the server's bearer token (as given to --token-env)."))
    send_inputs: bool = Field(True, description=(
        "Send the input images of the rows' prompt records (an edit's source), each distinct image once per "
        "request, so the served reward's Samples.inputs can load them; false: send text and metadata only (for a "
        "served reward that never reads them, or a server too old to take them)."))

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, "url")


class VLMJudgeOptions(_ClientOptions):
    base_url: str = Field(description=(
        "Base URL of the OpenAI-compatible API, ending where /chat/completions is appended, e.g. "
        "http://127.0.0.1:8001/v1 for `vllm serve`."))
    model: str = Field(description="Model name as the server lists it under GET /models.")
    api_key_env: str | None = Field(None, description=(
        "Name of the environment variable holding the API key (sent as a bearer token); null: none."))
    prompt_template: str = Field(
        "Does this image show {prompt}? Answer yes or no.",
        description=(
            "The question sent with each image; {prompt} is replaced by the sample's prompt. Optional markers "
            "place the images within the text: {image} (the sample) and {input_images} (the record's input "
            "images, with input_images); a marker left out puts its images before the text, input images first."))
    input_images: bool = Field(False, description=(
        "Also send each row's input images (its prompt record's, e.g. an edit's source), before the sample image "
        "unless prompt_template places them with {input_images}: for judges of edits ('is the second image a "
        "faithful edit of the first?'). A row without one is an error."))
    system_prompt: str | None = Field(None, description="Optional system message sent before the question.")
    mode: Literal["yes-probability", "number"] = Field("yes-probability", description=(
        "yes-probability: P(yes) / (P(yes) + P(no)) from the first answer token's top logprobs; number: the "
        "first number in the answer divided by max_score."))
    yes_tokens: list[str] = Field(["yes"], min_length=1, description=(
        "yes-probability: answer tokens that mean yes (compared stripped, and lower-cased unless case_sensitive)."))
    no_tokens: list[str] = Field(["no"], min_length=1, description="yes-probability: answer tokens that mean no.")
    case_sensitive: bool = Field(False, description="yes-probability: compare tokens with their case.")
    top_logprobs: int = Field(20, ge=1, le=20, description="yes-probability: alternatives asked per answer token.")
    max_score: float = Field(10.0, gt=0, description="number: the answer's number is divided by this.")
    number_after: str | None = Field(None, description=(
        "number: read the first number after this marker (e.g. 'Final Score:'), not the first in the answer."))
    max_tokens: int | None = Field(None, ge=1, description=(
        "Answer length limit; null: 1 for yes-probability, 512 for number."))
    check_model: bool = Field(True, description=(
        "At build, check that GET /models lists `model` (a wrong name fails when the run starts)."))
    max_concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once (one image each).")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, "base_url")

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("prompt_template must contain {prompt}, where the sample's prompt goes")
        for marker in ("{image}", "{input_images}"):
            if v.count(marker) > 1:
                raise ValueError(f"prompt_template holds {marker} {v.count(marker)} times; it places the images "
                                 "once")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> VLMJudgeOptions:
        if "{input_images}" in self.prompt_template and not self.input_images:
            raise ValueError("prompt_template places {input_images}, but input_images is false: set "
                             "input_images: true to send the records' input images")
        return self


class FlowGRPORemoteOptions(_ClientOptions):
    url: str = Field(description="URL of the Flow-GRPO reward server (its POST / endpoint), e.g. http://127.0.0.1:18085.")
    server: Literal["deqa", "geneval", "unifiedreward"] = Field(description=(
        "Which of Flow-GRPO's servers: deqa sends images; unifiedreward images and prompts; geneval images, "
        "per-sample metadata and only_strict."))
    score_key: str | None = Field(None, description=(
        "Key of the reply holding the per-image scores; null: `outputs` (deqa, unifiedreward) or `scores` "
        "(geneval; `strict_rewards` and `rewards` are the others)."))
    only_strict: bool = Field(True, description="geneval: sent as `only_strict` (skip the non-strict accuracy).")
    jpeg_quality: int = Field(75, ge=1, le=100, description=(
        "JPEG quality of the images sent (Flow-GRPO's client uses PIL's default, 75)."))
    batch_size: int = Field(64, ge=1, description="Images per request (Flow-GRPO's client: 64).")
    timeout: float = Field(120.0, gt=0, description="Seconds one HTTP request may take.")
    max_concurrency: int = Field(1, ge=1, le=256, description=(
        "Requests in flight at once (more only helps a server with several workers, e.g. gunicorn)."))
    max_reply_mb: float = Field(64.0, gt=0, description="Largest reply read, in MiB; a larger one is an error.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, "url")


def _build_remote(options: RemoteOptions, ctx: Any) -> Any:
    from flowfactory_rewards_remote.remote import build_remote

    return build_remote(options)


def _build_vlm_judge(options: VLMJudgeOptions, ctx: Any) -> Any:
    from flowfactory_rewards_remote.vlm import VLMJudge

    return VLMJudge(options)


def _build_flow_grpo(options: FlowGRPORemoteOptions, ctx: Any) -> Any:
    from flowfactory_rewards_remote.flowgrpo import FlowGRPORemote

    return FlowGRPORemote(options)


@hookimpl
def register_rewards(register):
    register("remote", _build_remote, options=RemoteOptions,
             summary="A reward served by `ff reward serve` on another process or machine (HTTP).")
    register("vlm-judge", _build_vlm_judge, options=VLMJudgeOptions,
             summary="A VLM judge behind an OpenAI-compatible endpoint: P(yes) from logprobs, or a number.")
    register("flow-grpo-remote", _build_flow_grpo, options=FlowGRPORemoteOptions,
             summary="Client of Flow-GRPO's reward servers (DeQA, GenEval, UnifiedReward); replies never unpickled.")


@hookimpl
def register_commands(app):
    from flowfactory_rewards_remote.cli import reward_app

    app.add_typer(reward_app(), name="reward")
