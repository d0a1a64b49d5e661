"""`ServeConfig`: every option of `expert-hub serve`, each declared once.

`expert-hub serve` builds its options from these fields (`cli/config_options.py`), `run_server` and the server
read them from here, and `serve --replicas` hands each replica the same command from them (`replica_argv`), so a
new option is one new field. Options vLLM's own server takes pass through untouched (`vllm_args`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import InvalidInputError
from ..settings import DTYPES, field_default, option_flags, setting

# Options that concern the endpoint or Ray, never each replica's own server (which listens where its replica says,
# with a key of its own).
FRONT_OPTIONS = frozenset({"host", "port", "api_key", "public_metrics", "replicas", "ray_address"})


@dataclass(frozen=True)
class ServeConfig:
    """How a server of many tasks on one base runs: what it serves, where, how tasks share the expert bank and
    wait for it, and (with `replicas`) how many servers stand behind the endpoint."""

    base: str | None = setting(
        None,
        default_help="the demo base",
        help="Base MoE model (directory or Hub id) served to every task.",
    )
    tasks: str = setting("", help="Comma-separated tasks: registry names (law, law@3) or NAME=ADAPTER_DIR.")
    all_tasks: bool = setting(False, flags=("--all-tasks",), help="Serve every registered task of this base.")
    host: str = setting("127.0.0.1", help="Address to listen on.")
    port: int = setting(8000, help="Port to listen on.")
    api_key: str | None = setting(
        None,
        envvar="EXPERT_HUB_API_KEY",
        help="Require this key (Authorization: Bearer) on every route but /health.",
    )
    dtype: str = setting("auto", choices=DTYPES, help="Weights dtype.")
    max_model_len: int | None = setting(None, help="Longest prompt + completion.")
    max_resident_tasks: int | None = setting(
        None,
        min=1,
        default_help="as many as the bank's rows hold",
        help="At most this many tasks resident at once.",
    )
    expert_bank_rows: int | None = setting(
        None,
        min=1,
        default_help="room for every served task at once, within an eighth of the device's free memory",
        help="Extra expert rows per MoE layer.",
    )
    expert_bank_gb: float | None = setting(
        None, help="Size the expert bank in GiB per GPU instead (all MoE layers together)."
    )
    task_cache_gb: float | None = setting(
        None,
        default_help="1/8 of free RAM",
        help="Host memory (GiB) keeping evicted tasks' rows for fast reloads.",
    )
    task_wait_timeout: float = setting(60.0, help="Seconds a request waits for its task to be loaded before a 503.")
    allow_pull: tuple[str, ...] = setting(
        (),
        repeatable=True,
        metavar="'ORG/*'",
        help="Let a request name a Hub repo matching this pattern (repeatable): pulled, verified and served.",
    )
    max_waiting_requests: int = setting(
        1024, min=1, help="Requests that may wait for their tasks at once; more get a 503."
    )
    kv_cache_gb: float | None = setting(
        None,
        default_help="on CPU, what --max-model-len and the batch need, at most half the free memory",
        help="KV cache memory in GiB.",
    )
    public_metrics: bool = setting(False, flags=("--public-metrics",), help="Serve /metrics without the API key.")
    replicas: int | None = setting(
        None,
        min=1,
        help="Run this many servers behind the one endpoint on Ray Serve, each request sent to a replica that "
        "holds its task (needs expert-hub[ray]).",
    )
    ray_address: str | None = setting(
        None, help="Join this Ray cluster (e.g. auto) instead of starting Ray on this machine; with --replicas."
    )
    vllm_args: tuple[str, ...] = setting((), cli=False, help="Options for vLLM's own server, passed as given.")

    def __post_init__(self) -> None:
        for flag, value in (
            ("--expert-bank-gb", self.expert_bank_gb),
            ("--kv-cache-gb", self.kv_cache_gb),
            ("--task-wait-timeout", self.task_wait_timeout),
        ):
            if value is not None and not value > 0:
                raise InvalidInputError(f"{flag} must be positive, got {value}")
        if self.task_cache_gb is not None and not self.task_cache_gb >= 0:
            raise InvalidInputError(f"--task-cache-gb must be 0 or more, got {self.task_cache_gb}")
        for pattern in self.allow_pull:  # an organisation must be named: no `*` or `*/*`
            organisation, slash, _ = pattern.partition("/")
            if not slash or not organisation or any(character in organisation for character in "*?["):
                raise InvalidInputError(f"--allow-pull {pattern!r}: name an organisation, e.g. 'acme/*' or 'acme/law'")
        if self.ray_address and not self.replicas:
            raise InvalidInputError("--ray-address runs replicas: give --replicas N too")
        if self.expert_bank_rows and self.expert_bank_gb:
            raise InvalidInputError("give --expert-bank-rows or --expert-bank-gb, not both")

    @classmethod
    def front_flags(cls) -> frozenset[str]:
        """The command-line names of `FRONT_OPTIONS`."""
        return frozenset(option_flags(f)[0] for f in fields(cls) if f.name in FRONT_OPTIONS)

    @property
    def task_specs(self) -> list[str]:
        """The tasks named, in order."""
        return [spec.strip() for spec in self.tasks.split(",") if spec.strip()]

    def vllm_argv(self) -> list[str]:
        """vLLM's server options for these settings (the base aside), then the user's own."""
        argv = ["--host", self.host, "--port", str(self.port), "--dtype", self.dtype, *self.vllm_args]
        argv += ["--max-model-len", str(self.max_model_len)] if self.max_model_len else []
        argv += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gb * 2**30))] if self.kv_cache_gb else []
        return argv

    def replica_argv(self) -> list[str]:
        """`expert-hub serve`'s options for each replica: every option given but the endpoint's and Ray's
        (`FRONT_OPTIONS`), in declaration order, then vLLM's."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if not f.metadata["cli"] or f.name in FRONT_OPTIONS or value == field_default(f) or value is None:
                continue
            flag = option_flags(f)[0]
            if isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [
                    item for each in (value if isinstance(value, tuple) else [value]) for item in (flag, str(each))
                ]
        return [*argv, *self.vllm_args]
