"""The stage contract as one decorator: a task that produces an artifact is written as its compute body.

    def dataset_key(data: DataConfig) -> Key:                 # typed, from the task's parameters
        return Key({"data": data, "source_stamp": stamp(data)})

    @stage("dataset", key=dataset_key, task_name="materialize-dataset")
    def materialize_dataset(data: DataConfig, store: str, run: StageRun) -> Publish:
        train = data.load(data.train_split)                   # runs only when the artifact is missing
        def write(staging: Staging) -> DatasetInfo:
            ...                                               # the files, into the staging directory
            return DatasetInfo(...)                           # the stage's own manifest fields, typed
        return Publish(write, seeds={"sample": data.seed})

`stage` turns the body into a Prefect task that

1. computes the artifact key: `key` is a function of some of the task's parameters, matched by
   name, returning a `Key` (config and upstream artifact keys); the store key hashes (stage,
   config, inputs, format version), and the manifest records exactly that config and those
   inputs, so every manifest says how to recompute its own key;
2. returns at once when the store already holds the artifact (what `result` makes of it; by
   default its `ArtifactRef`), without running the body;
3. otherwise runs the body and publishes what it returns: the store stages the files, writes
   the manifest (the store's fields plus the body's `StageInfo`) and moves it into place; the
   work directory the body asked for (`run.work_dir()`) is removed once the artifact is out;
4. gives Prefect the same key as its cache key (`tasks.store.store_cache_key_fn`, offered only
   once the artifact exists; extended by the task's name and the parameters `result` reads,
   since tasks sharing an artifact return different values) and retries once after a delay,
   except on bad input (a `ValueError` or `TypeError`: a second try cannot help and would
   only hide the message).

`run` (a `StageRun`: key, store, work directory) is the body's own argument, not a task
parameter: callers, Prefect and `task.fn` see the body's signature without it. With
`publish=False` the body contributes to an artifact that another task publishes (one expert
of a set) or publishes through other stages' bodies; it still gets the key, the shortcut on
a hit and the cache key. With `cache=False` Prefect never skips the task (report stages that
show their table in every flow run), while the store still does.
"""

from __future__ import annotations

import functools
import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from prefect import task
from pydantic import BaseModel, ConfigDict

from tasks.artifacts import ArtifactRef
from tasks.store import Artifact, ArtifactStore, Staging, artifact_key, store_cache_key_fn, work_dir

__all__ = ["Key", "StageInfo", "RowsInfo", "Manifest", "Publish", "StageRun", "stage", "stage_key", "RETRY_DELAY_S"]

RETRY_DELAY_S = 10  # long enough for a lost Ray worker or a flaky object store to come back


@dataclass(frozen=True)
class Key:
    """What names a stage output: its config (any JSON-able value, configs included) and upstream keys, in order."""

    config: Any
    inputs: Sequence[str] = ()


class StageInfo(BaseModel):
    """Base of a stage's own manifest fields (beside the store's: key, files, config, cost, ...).

    Writers set only the fields they know (unset ones are left out of the manifest, as a dict
    writer would); readers get typed fields back with `Info.of(ref)`, ignoring fields of others.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def of(cls, source: ArtifactRef | Artifact | dict[str, Any]):
        """The fields of this model from an artifact's manifest (read, not the files: nothing is hashed)."""
        if isinstance(source, ArtifactRef):
            manifest = ArtifactStore(source.store).manifest(source.stage, source.key)
        else:
            manifest = source.manifest if isinstance(source, Artifact) else source
        return cls.model_validate({k: v for k, v in manifest.items() if k in cls.model_fields})

    def manifest_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class RowsInfo(StageInfo):
    """Manifest fields of a table stage (metrics, reports): how many rows it holds."""

    rows: int


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    sha256: str
    bytes: int


class Manifest(BaseModel):
    """`manifest.json` as `tasks.store` writes it; a stage's own fields stay in `model_extra`."""

    model_config = ConfigDict(frozen=True, extra="allow")

    stage: str
    key: str
    format_version: int
    inputs: list[str]
    config: Any = None
    files: dict[str, FileEntry]
    seeds: Any = None
    rows: Any = None
    wall_time_s: float | None = None  # the write alone
    task_s: float | None = None  # the Prefect task run that published it: compute and write
    compute_s: float | None = None  # declared by stages whose work ran in other tasks (an expert set)
    peak_rss_mb: float | None = None
    created_at: str | None = None

    @classmethod
    def of(cls, ref: ArtifactRef) -> Manifest:
        return cls.model_validate(ArtifactStore(ref.store).manifest(ref.stage, ref.key))

    def cost_s(self) -> float:
        """What producing the artifact cost: declared compute, else the publishing task run, else the write."""
        for value in (self.compute_s, self.task_s, self.wall_time_s):
            if value is not None:
                return float(value)
        return 0.0


@dataclass
class Publish:
    """What a stage body hands to the store: a writer of files (returning the typed manifest fields) and seeds."""

    write: Callable[[Staging], StageInfo]
    seeds: Any = None


@dataclass
class StageRun:
    """The body's view of its own run: the key it publishes under and a work directory that survives retries."""

    stage: str
    key: str
    store: str
    _work: list[Path] = field(default_factory=list, repr=False)

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(store=self.store, stage=self.stage, key=self.key)

    def work_dir(self) -> Path:
        """`<store>/.work/<stage>/<key>` (see `tasks.store.work_dir`), removed once the artifact is published."""
        path = work_dir(self.store, self.stage, self.key)
        self._work.append(path)
        return path


def _named_call(fn: Callable[..., Any], values: dict[str, Any]) -> Any:
    return fn(**{name: values[name] for name in inspect.signature(fn).parameters})


def _check_names(fn: Callable[..., Any], available: set[str], what: str, body: str) -> None:
    missing = set(inspect.signature(fn).parameters) - available
    if missing:
        raise TypeError(
            f"stage {body}: the {what} function {fn.__name__} takes {sorted(missing)}, which are not parameters of "
            f"the task; valid names: {', '.join(sorted(available))}"
        )


def _retryable(task_: Any, task_run: Any, state: Any) -> bool:
    """Retry crashes and I/O errors; a ValueError/TypeError (bad input, a bug) fails at once with its message."""
    return not isinstance(state.data, (ValueError, TypeError))


def stage(
    name: str,
    *,
    key: Callable[..., Key],
    result: Callable[..., Any] | None = None,
    publish: bool = True,
    cache: bool = True,
    task_name: str | None = None,
    task_run_name: str | None = None,
    retries: int = 1,
    retry_delay_s: float = RETRY_DELAY_S,
) -> Callable[[Callable[..., Any]], Any]:
    """Make a stage body a Prefect task (see the module docstring).

    key: typed function of task parameters (by name) -> Key.
    result: what the task returns, from the published artifact (`ref`) and task parameters (by
        name); on a hit and after publishing alike. Default: the artifact's ArtifactRef.
    publish: False for bodies that do not publish under this key themselves (their value is
        returned on a miss; `result` is used on a hit).
    cache: False keeps Prefect from skipping the task (the store still returns a hit at once).
    """

    def decorate(body: Callable[..., Any]) -> Any:
        where = f"{name!r} ({body.__name__})"
        signature = inspect.signature(body)
        if "run" not in signature.parameters or "store" not in signature.parameters:
            raise TypeError(f"stage {where}: the body must take `store` (the store URI) and `run` (its StageRun)")
        public = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "run"])
        names = set(public.parameters)
        _check_names(key, names, "key", where)
        if result is not None:
            _check_names(result, names | {"ref"}, "result", where)
        defaults = {n: p.default for n, p in public.parameters.items() if p.default is not inspect.Parameter.empty}

        def key_for(params: dict[str, Any]) -> str:
            k = _named_call(key, {**defaults, **params})
            return artifact_key(name, k.config, list(k.inputs))

        def key_of(params: dict[str, Any]) -> tuple[str, str]:
            return params["store"], key_for(params)

        @functools.wraps(body)
        def run_stage(*args: Any, **kwargs: Any) -> Any:
            bound = public.bind(*args, **kwargs)
            bound.apply_defaults()
            params = dict(bound.arguments)
            k = _named_call(key, params)
            run = StageRun(name, artifact_key(name, k.config, list(k.inputs)), params["store"])
            store = ArtifactStore(run.store)
            hit = store.exists(name, run.key)
            if not hit:
                out = body(**params, run=run)
                if not publish:
                    return out
                if not isinstance(out, Publish):
                    raise TypeError(f"stage {where} returned {type(out).__name__}, expected Publish(write, seeds)")
                store.publish(
                    name,
                    run.key,
                    functools.partial(_write_info, out.write, where),
                    config=k.config,
                    inputs=list(k.inputs),
                    seeds=out.seeds,
                )
                for path in run._work:
                    shutil.rmtree(path, ignore_errors=True)
            if hit:
                _say_reused(f"{name}/{run.key}", run_stage)
            return run.ref if result is None else _named_call(result, {**params, "ref": run.ref})

        # Prefect caches a task's return value, so its cache key names the artifact (the store's key, offered
        # once published) and also the task and every parameter `result` reads: the tasks of one stage (train
        # one expert, publish the set) and rows that carry labels outside the key must not share a result.
        store_key_fn = store_cache_key_fn(name, key_of)
        result_names = sorted(set(inspect.signature(result).parameters) - {"ref"}) if result is not None else []
        label = task_name or name

        def cache_key_fn(context: Any, params: dict[str, Any]) -> str | None:
            found = store_key_fn(context, params)
            if found is None:
                return None
            params = {**defaults, **params}
            return f"{found}-{label}" + (
                f"-{artifact_key(label, {n: params[n] for n in result_names})}" if result_names else ""
            )

        run_stage.__signature__ = public  # type: ignore[attr-defined]
        run_stage.__annotations__ = {k: v for k, v in body.__annotations__.items() if k != "run"}
        run_stage.key_for = key_for  # type: ignore[attr-defined]
        return task(
            run_stage,
            name=label,
            task_run_name=task_run_name,
            cache_key_fn=cache_key_fn if cache else None,
            result_serializer="json",
            retries=retries,
            retry_delay_seconds=retry_delay_s,
            retry_condition_fn=_retryable,
        )

    return decorate


def _say_reused(what: str, fn: Callable[..., Any]) -> None:
    """Report a store hit inside this stage's own task run: a finished progress artifact whose
    description reads "reused <stage>/<key> from the artifact store", and the same log line.

    Prefect's own cache hit shows as "Cached"; a store hit happens inside the task, which then
    completes normally, so this is how the UI and `flows.watch` tell a reused stage from one that
    ran. A plain `.fn` call (also from inside another task) reports nothing.
    """
    from prefect.artifacts import create_progress_artifact
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or getattr(ctx.task, "fn", None) is not fn:
        return
    message = f"reused {what} from the artifact store"
    create_progress_artifact(progress=100.0, description=message)
    from tasks.reports import run_logger

    run_logger().info(message)


def _write_info(write: Callable[[Staging], StageInfo], where: str, staging: Staging) -> dict[str, Any]:
    info = write(staging)
    if not isinstance(info, StageInfo):
        raise TypeError(f"stage {where}: its writer returned {type(info).__name__}, expected a StageInfo model")
    return info.manifest_fields()


def stage_key(stage_task: Any, **params: Any) -> str:
    """The artifact key a stage task computes for these parameters (e.g. an upstream key inside another key)."""
    return stage_task.fn.key_for(params)
