"""Carry the policy settings from the launcher to SGLang's spawned processes (environment)."""

from __future__ import annotations

import functools
import os

from ..policy import PolicyConfig

ENV_VAR = "DKV_SGLANG_CONFIG"


def publish(config: PolicyConfig) -> None:
    """Make ``config`` the one every process started from now on reads."""
    os.environ[ENV_VAR] = config.to_json()


def current() -> PolicyConfig:
    """The published settings; vanilla ``full`` when none were published. (Scheduler hooks
    ask for it per request: parsed once per published text.)"""
    text = os.environ.get(ENV_VAR)
    return _parse(text) if text else PolicyConfig()


@functools.lru_cache(maxsize=8)
def _parse(text: str) -> PolicyConfig:
    return PolicyConfig.from_json(text)


PAGE_SIZE_VAR = "DKV_SGLANG_PAGE_SIZE"


def publish_page_size(page_size: int) -> None:
    """The dkv pool's physical page size (head-rows per page); SGLang's own stays 1."""
    os.environ[PAGE_SIZE_VAR] = str(int(page_size))


def page_size() -> int:
    return int(os.environ.get(PAGE_SIZE_VAR, "1"))
