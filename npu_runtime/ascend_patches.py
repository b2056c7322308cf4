"""Every vllm-ascend symbol dpserve's Ascend adapter uses, wraps or subclasses, with its check.

The counterpart of npu_runtime.vllm_patches for vllm-ascend (0.23.0.post1): `SYMBOLS` declares each
symbol (module, qualname, how it is touched, the parameters or attributes the adapter relies on),
`checks()` compares them with the vllm-ascend in use and `require(feature)` refuses a feature whose
symbols do not all fit, with the vllm-ascend version and each symbol in the error.

Two ways to read a symbol, because most of vllm-ascend imports `torch_npu` at module level:

* by import (`inspect.signature`), where the module loads (on an Ascend node: all of them);
* by source (`ast` over the module's file, found from the `vllm_ascend` package's location, which
  loads without NPU libraries), where it does not, and always for `vllm_ascend.patch.*` (importing
  one applies vllm-ascend's patches in the checking process). Instance attributes (`self.log2phy = ...`) are
  always read from the source: a class does not carry them before an instance exists.

Nothing here applies a patch: the adapter touches vllm-ascend per instance (eplb.ascend) or by
subclassing the scheduler vllm-ascend binds (npu_runtime.ascend_scheduler).

Features:
* `ascend_eplb`: online EPLB on Ascend (eplb.ascend): redundant slots allocated at start-up by
  vllm-ascend's own `eplb_config.expert_map_path` (its dynamic updater left off), routing through
  each layer's `log2phy` table, weights and tables updated in place, load from each layer's
  `FusedExpertsResult.expert_tokens`, the step hooks on `NPUWorker` / `NPUModelRunner`.
* `ascend_balance`: the balance scheduler on top of the `Scheduler` vllm-ascend's platform patch
  binds (`patch_balance_schedule.BalanceScheduler`, whose `balance_gather` its DP engine loop calls).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from npu_runtime.vllm_patches import EXACT, HAS, PREFIX, VllmPatchError, compare_params

logger = logging.getLogger("dpserve.ascend_patches")

SUPPORTED = "0.23.0.post1"  # the vllm-ascend these declarations were read from

FEATURES: dict[str, str] = {
    "ascend_eplb": "online expert load balancing (EPLB) on Ascend",
    "ascend_balance": "the balance scheduler on Ascend",
}

# The module vllm-ascend's balance scheduling lives in, and the class it binds as vLLM's Scheduler.
BALANCE_MODULE = "vllm_ascend.patch.platform.patch_balance_schedule"
BALANCE_SCHEDULER = f"{BALANCE_MODULE}.BalanceScheduler"
VLLM_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"


@dataclass(frozen=True)
class AscendSymbol:
    """One vllm-ascend symbol. `params=None`: its parameters are not checked; `attrs`: attributes an
    instance (or the module, for a module-level name) must set; `rebinds`: a dotted name the module
    assigns this symbol to at import (a monkeypatch the adapter depends on)."""

    feature: str
    module: str
    qualname: str
    how: str  # used | wrapped-per-instance | subclassed | reads | config
    params: tuple[str, ...] | None = None
    match: str = EXACT
    attrs: tuple[str, ...] = ()
    rebinds: str | None = None
    why: str = ""

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.qualname}"


_EPLB_UTILS = "vllm_ascend.eplb.core.eplb_utils"
_MOE = "vllm_ascend.ops.fused_moe"

SYMBOLS: tuple[AscendSymbol, ...] = (
    AscendSymbol("ascend_eplb", "vllm_ascend.ascend_config", "EplbConfig.__init__", "config",
                 ("self", "user_config"), why="additional_config.eplb_config: expert_map_path, dynamic_eplb off"),
    AscendSymbol("ascend_eplb", _EPLB_UTILS, "init_eplb_config", "used",
                 ("eplb_config", "layer_id", "moe_config", "mix_placement", "num_shared_experts", "tp_size"),
                 why="allocates the redundant slots and log2phy from our expert_map_path file"),
    AscendSymbol("ascend_eplb", _EPLB_UTILS, "expert_file_to_tensor", "used", ("expert_map_path", "layer_id"),
                 why="reads the expert map file eplb.ascend.placement writes"),
    AscendSymbol("ascend_eplb", _EPLB_UTILS, "generate_log2phy_map", "used",
                 ("global_expert_map", "ep_rank", "tp_size"),
                 why="its replica choice per rank is the one eplb.ascend.placement.rank_log2phy makes"),
    AscendSymbol("ascend_eplb", f"{_MOE}.fused_moe_0_23_0", "AscendFusedMoE", "reads",
                 attrs=("log2phy", "global_expert_map", "_expert_map", "global_redundant_expert_num",
                        "local_num_experts", "moe_instance_id", "quant_method", "dynamic_eplb"),
                 why="the MoE layer vLLM 0.23 runs on Ascend; its slots, tables and quant method"),
    AscendSymbol("ascend_eplb", f"{_MOE}.fused_moe", "AscendFusedMoE", "used",
                 why="imported from here (for vLLM 0.23 it re-exports fused_moe_0_23_0's)"),
    AscendSymbol("ascend_eplb", f"{_MOE}.fused_moe_0_23_0", "AscendFusedMoE.forward_impl", "reads",
                 ("self", "hidden_states", "router_logits"), PREFIX,
                 why="calls self.quant_method.apply(layer=self, ...), which the load hook wraps"),
    AscendSymbol("ascend_eplb", f"{_MOE}.moe_comm_method", "FusedExpertsResult", "reads",
                 attrs=("routed_out", "expert_tokens", "group_list_type"),
                 why="expert_tokens per local slot: the load the MoE path exposes without dynamic EPLB"),
    AscendSymbol("ascend_eplb", "vllm_ascend.eplb.adaptor.vllm_adaptor", "EPLB_EXPERT_WEIGHT_NAMES", "used",
                 why="which weights make up one expert slot (unquantized: w13_weight, w2_weight)"),
    AscendSymbol("ascend_eplb", "vllm_ascend.quantization.quant_type", "QuantType", "used"),
    AscendSymbol("ascend_eplb", "vllm_ascend.ascend_config", "get_ascend_config", "used", (),
                 why="enable_fused_mc2 picks the slot tensors' names"),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.worker", "NPUWorker.execute_model", "wrapped-per-instance",
                 ("self", "scheduler_output"), PREFIX, why="step timing (eplb.steplog.StepLog)"),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.worker", "NPUWorker.sample_tokens", "wrapped-per-instance",
                 ("self",), PREFIX),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.worker", "NPUWorker.execute_dummy_batch",
                 "wrapped-per-instance", ("self",), PREFIX),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.worker", "NPUWorker", "reads", attrs=("model_runner",)),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.model_runner_v1", "NPUModelRunner._sync_metadata_across_dp",
                 "wrapped-per-instance", ("self", "num_tokens", "is_draft_model", "cudagraph_mode",
                                          "allow_dp_padding"),
                 why="the per-step DP all-reduce on Ascend (vLLM's _run_ar is not called): the step sync"),
    AscendSymbol("ascend_eplb", "vllm_ascend.worker.model_runner_v1", "NPUModelRunner", "reads",
                 attrs=("dp_size", "dp_rank")),
    AscendSymbol("ascend_eplb", "vllm_ascend.platform", "NPUPlatform.check_and_update_config", "used",
                 ("cls", "vllm_config"), why="names vllm_ascend.worker.worker.NPUWorker when worker_cls is auto"),
    AscendSymbol("ascend_balance", BALANCE_MODULE, "BalanceScheduler", "subclassed", rebinds=VLLM_SCHEDULER,
                 why="vLLM's Scheduler after vllm-ascend's platform patches: the balance scheduler's base"),
    AscendSymbol("ascend_balance", BALANCE_MODULE, "BalanceScheduler.__init__", "subclassed",
                 ("self", "vllm_config", "kv_cache_config", "structured_output_manager", "block_size"), PREFIX),
    AscendSymbol("ascend_balance", BALANCE_MODULE, "BalanceScheduler.schedule", "subclassed", ("self",), PREFIX,
                 why="called as super().schedule() with the waiting queue hidden"),
    AscendSymbol("ascend_balance", BALANCE_MODULE, "BalanceScheduler.balance_gather", "used",
                 ("self", "dp_group"), why="its DP engine loop calls it on the scheduler every step"),
)  # fmt: skip


class AscendPatchError(VllmPatchError):
    """A feature refused because vllm-ascend's symbols do not fit dpserve's Ascend adapter."""


@dataclass
class AscendCheck:
    symbol: AscendSymbol
    problem: str | None = None  # None: the symbol fits
    way: str = "source"  # how it was read: "import" or "source"

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.symbol.feature, "symbol": self.symbol.symbol, "how": self.symbol.how,
                "ok": self.problem is None, "problem": self.problem, "checked_by": self.way}  # fmt: skip


# ---- reading vllm-ascend's sources -------------------------------------------------------------------


def source_root() -> Path | None:
    """The directory holding the `vllm_ascend` package (None when it is not importable). Finding
    it imports only `vllm_ascend/__init__.py`, which needs no NPU library."""
    spec = importlib.util.find_spec("vllm_ascend")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def version(root: Path | None = None) -> str:
    """vllm-ascend's version from its generated `_version.py` (read, not imported)."""
    root = root or source_root()
    if root is None:
        return "not installed"
    path = root / "vllm_ascend" / "_version.py"
    try:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                getattr(t, "id", "") == "__version__" for t in node.targets
            ):
                return str(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return "unknown"


def module_file(root: Path, module: str) -> Path:
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _defined(body: list[ast.stmt], name: str) -> ast.AST | None:
    """The definition of `name` in a block, looking into if/else and try blocks (vllm-ascend defines
    some classes per vLLM version); the first one found."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return node  # re-exported (e.g. the MoE layer for the running vLLM version)
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
        for sub in ("body", "orelse", "finalbody"):
            if isinstance(node, (ast.If, ast.Try)) and getattr(node, sub, None):
                found = _defined(getattr(node, sub), name)
                if found is not None:
                    return found
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Parameter names in inspect.signature's order."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args]
    names += [a.vararg.arg] if a.vararg else []
    names += [p.arg for p in a.kwonlyargs]
    names += [a.kwarg.arg] if a.kwarg else []
    return names


def _instance_attrs(cls: ast.ClassDef) -> set[str]:
    """Names a class defines (methods, class attributes, dataclass fields) or assigns on `self`."""
    names: set[str] = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(cls):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    names.add(e.attr)
    return names


def _rebinds(tree: ast.Module, target: str, name: str) -> bool:
    """Whether the module assigns `name` to the dotted `target` at module level."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id == name:
            if any(ast.unparse(t) == target for t in node.targets):
                return True
    return False


def check_source(sym: AscendSymbol, root: Path) -> str | None:
    """What is wrong with `sym` in the sources under `root` (None: it fits)."""
    path = module_file(root, sym.module)
    if not path.is_file():
        return f"module {sym.module} has no source file ({path})"
    tree = ast.parse(path.read_text(), filename=str(path))
    node: ast.AST | None = tree
    parts = sym.qualname.split(".")
    for part in parts:
        body = node.body if isinstance(node, (ast.Module, ast.ClassDef)) else []
        node = _defined(body, part)
        if node is None:
            return "does not exist"
    if sym.params is not None:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return "is not a function"
        problem = compare_params(sym.params, _params(node), sym.match)
        if problem:
            return problem
    if sym.attrs:
        if not isinstance(node, ast.ClassDef):
            return "is not a class"
        missing = [a for a in sym.attrs if a not in _instance_attrs(node)]
        if missing:
            return f"sets no attribute(s) {missing}"
    if sym.rebinds and not _rebinds(tree, sym.rebinds, parts[-1]):
        return f"is not assigned to {sym.rebinds} at import"
    return None


def check_import(sym: AscendSymbol) -> tuple[str | None, bool]:
    """(problem, imported): the signature check by import; imported=False when the module does not
    load here (e.g. it needs torch_npu), and the caller reads the source instead."""
    try:
        obj: Any = importlib.import_module(sym.module)
    except Exception:  # ImportError of torch_npu, or a vLLM it was not written for: read the source
        return None, False
    try:
        for part in sym.qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        return "does not exist", True
    if sym.params is None:
        return None, True
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        return f"has no signature ({exc})", True
    return compare_params(sym.params, list(sig.parameters), sym.match), True


def check_symbol(sym: AscendSymbol, root: Path | None = None, by_import: bool = True) -> AscendCheck:
    """Check one symbol: by import where its module loads (and `by_import`), by source otherwise;
    attributes and module-level rebinding always by source."""
    root = root or source_root()
    if root is None:
        return AscendCheck(sym, "vllm_ascend is not importable", "none")
    way = "source"
    # Importing one of vllm-ascend's patch modules applies its patches (and its package's): read those.
    if by_import and not sym.module.startswith("vllm_ascend.patch."):
        problem, imported = check_import(sym)
        if imported:
            way = "import"
            if problem:
                return AscendCheck(sym, problem, way)
            if not sym.attrs and not sym.rebinds:
                return AscendCheck(sym, None, way)
    return AscendCheck(sym, check_source(sym, root), way)


# ---- feature checks ----------------------------------------------------------------------------------


@dataclass
class _State:
    checks: dict[AscendSymbol, AscendCheck] = field(default_factory=dict)


_STATE = _State()


def checks(features: list[str] | None = None, root: Path | None = None, by_import: bool = True,
           refresh: bool = False) -> list[AscendCheck]:  # fmt: skip
    """The checks of `features` (None: all), each run once per process unless `refresh`."""
    wanted = set(FEATURES if features is None else features)
    unknown = wanted - set(FEATURES)
    if unknown:
        raise KeyError(f"unknown feature(s) {sorted(unknown)}; known: {sorted(FEATURES)}")
    out = []
    for sym in SYMBOLS:
        if sym.feature not in wanted:
            continue
        if refresh or root is not None or sym not in _STATE.checks:
            check = check_symbol(sym, root, by_import)
            if root is not None:  # an explicit tree (tests): not this process's vllm-ascend
                out.append(check)
                continue
            _STATE.checks[sym] = check
            if check.problem is not None:
                logger.error("dpserve: %s refused on vllm-ascend %s: %s %s", FEATURES[sym.feature], version(),
                             sym.symbol, check.problem)  # fmt: skip
        out.append(_STATE.checks[sym])
    return out


def require(*features: str, root: Path | None = None) -> None:
    """Raise AscendPatchError when any of `features` has a symbol that does not fit this vllm-ascend."""
    bad = [c for c in checks(list(features), root) if c.problem is not None]
    if bad:
        names = sorted({FEATURES[c.symbol.feature] for c in bad})
        details = "; ".join(f"{c.symbol.symbol} {c.problem}" for c in bad)
        raise AscendPatchError(
            f"dpserve refuses {', '.join(names)} on vllm-ascend {version(root)}: {details}"
        )


def features_for_engine(engine_args: dict[str, Any]) -> list[str]:
    """The Ascend features a rank's engine arguments (`AsyncEngineArgs` keywords) need."""
    needed = []
    if str(engine_args.get("worker_extension_cls") or "").startswith("eplb."):
        needed.append("ascend_eplb")
    if str(engine_args.get("scheduler_cls") or "").startswith("scheduler.balance_scheduler."):
        needed.append("ascend_balance")
    return needed


def require_for_engine(engine_args: dict[str, Any]) -> None:
    """Refuse (AscendPatchError) an Ascend engine whose features this vllm-ascend cannot carry."""
    require(*features_for_engine(engine_args))


def summary() -> str:
    """One line for `dpserve status`: vllm-ascend's version and the refused Ascend features, if any."""
    rep = report()
    if rep["vllm_ascend"] is None:
        return "vllm-ascend not installed"
    if not rep["refused"]:
        return f"vllm-ascend {rep['vllm_ascend']}: all {len(rep['symbols'])} symbols fit"
    return f"vllm-ascend {rep['vllm_ascend']}: refused {', '.join(rep['refused'])}"


def report() -> dict[str, Any]:
    """Every symbol's state in this process, for operators (empty when vllm-ascend is absent)."""
    if source_root() is None:
        return {"vllm_ascend": None, "refused": [], "symbols": []}
    every = checks()
    refused = sorted({c.symbol.feature for c in every if c.problem is not None})
    return {"vllm_ascend": version(), "refused": refused, "symbols": [c.as_dict() for c in every]}


__all__ = ["EXACT", "HAS", "PREFIX", "SYMBOLS", "AscendPatchError", "AscendSymbol", "check_source", "require"]
