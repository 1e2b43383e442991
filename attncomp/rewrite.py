"""Graph → graph: replace each matched attention site with an :class:`AttentionKernel` call.

For every site: match → analyze → plan (passes) → rewrite. Sites that are left (rule missed,
score program not expressible, user asked for none) keep their eager nodes; every decision is
appended to ``records`` for ``explain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from torch import fx

from attncomp.distributed import RING_MASKS, ContextParallel
from attncomp.frontend.analyze import analyze, check_program, mask_of, recognise_masks
from attncomp.frontend.guards import SizeGuards
from attncomp.frontend.mha import match_mha, mha_spec
from attncomp.frontend.roles import prove as prove_roles
from attncomp.frontend.rules import COUNTERS, Miss, Site, find_sites, module_path
from attncomp.ir import Causal, Full, Plan, mask_and
from attncomp.ir import ops_table as T
from attncomp.ir.program import AddBias, MaskFill, map_operands
from attncomp.passes import plan_site
from attncomp.runtime.site import extract_region
from attncomp.strategies import for_site
from attncomp.strategies.dense.mha import MHAKernel
from attncomp.strategies.softmax_site import AttentionKernel, KernelMask


@dataclass
class SiteRecord:
    """One line of the explain table."""

    path: str
    rule: str
    status: str          # "replaced" | "kept" (nothing to gain: the site's own nodes stay) | "left"
    reason: str
    spec: object = None
    plan: Plan | None = None
    kernel: AttentionKernel | None = None
    roles: object = None  # attncomp.roles.Roles: q, k, v and the axes, as proved (softmax sites)

    @property
    def strategy(self) -> str:
        return self.plan.strategy if self.plan and self.status == "replaced" else "eager"


def _terms_of(site: Site, uses=()) -> tuple[list, list, tuple]:
    """Replace fx.Node operands of the score program (and of proven masks' run-time parts) with
    ``("term", i)`` references; returns (steps, terms, kernel masks)."""
    terms: list = []

    def ref(x):
        if isinstance(x, fx.Node):
            if x not in terms:
                terms.append(x)
            return ("term", terms.index(x))
        if isinstance(x, (list, tuple)):
            return type(x)(ref(a) for a in x)
        return x

    steps = [map_operands(s, ref) for s in site.steps]
    if site.sdpa.get("attn_mask") is not None:
        site.sdpa = {**site.sdpa, "attn_mask": ref(site.sdpa["attn_mask"])}
    masks = tuple(KernelMask(u.static, None if u.keep_src is None else ref(u.keep_src)[1], u.keep_fn, u.fill,
                             op=u.src_op)
                  for u in uses)
    return steps, terms, masks


def _causal_only(spec) -> bool:
    return isinstance(spec.mask, Causal)


def _symbolic_note(site: Site, spec, uses) -> tuple[str, ...]:
    """The explain note of proved masks in a graph with symbolic sizes: proved for every length, or
    specialised (guarded) to the example shape."""
    if all(type(d) is int for o in (site.q, site.k) for d in (T.shape(o.node) or ())):
        return ()
    why = next((u.not_general for u in uses if u.specialised), None)
    if why is not None:
        return (f"sizes are symbolic: the mask is specialised to {spec.dims.Lq}x{spec.dims.Lk} (guard: another "
                f"length recompiles; not proved for every length: {why})",)
    return ("sizes are symbolic: the mask is proved for every length",)


def _erase_region(gm: fx.GraphModule, site: Site) -> None:
    region = set(site.region)
    cands = dict.fromkeys(site.region)
    for n in site.region:
        cands.update(dict.fromkeys(a for a in n.all_input_nodes if a.op != "placeholder"))
    changed = True
    while changed:
        changed = False
        for n in reversed(list(cands)):
            if n.users or n.op in ("placeholder", "output"):
                continue
            if n in region or T.is_op(n, T.TRANSPOSE | T.PERMUTE | T.VIEW | T.EXPAND | T.GETITEM, gm):
                gm.graph.erase_node(n)
                del cands[n]
                changed = True


def rewrite(gm: fx.GraphModule, parsed_strategy, records: list, guards: SizeGuards | None = None,
            verify: bool = True, context_parallel: ContextParallel | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place and return it. ``guards`` (Dynamo graphs): a mask of a graph with
    symbolic sizes whose proof needs the example sizes specialises the graph to them — the sizes are
    requested from ``guards``, which the caller installs once the rewrite is done (see
    :func:`attncomp.frontend.analyze.recognise_masks`); without it such a mask stays a tensor. ``verify``: each
    replaced site compares its first fused call with its own eager nodes
    (:class:`attncomp.sitemodule.SiteModule`). ``context_parallel``: every replaced site runs as ring
    attention over its process group; a site that cannot raises ``ValueError`` (run locally it would
    attend within this rank's shard only: silently wrong)."""
    found = find_sites(gm)
    memo: dict = {}  # mask proofs by node: one mask is usually read by every layer
    moved: dict = {}  # output node of a replaced site -> its kernel call (a later site may read it)
    for i, site in enumerate(found):
        if isinstance(site, Miss):
            records.append(SiteRecord(site.module_path, site.rule, "left", site.reason))
            continue
        if not isinstance(site, Site):  # linear / tensor attention: lowered whole to their op
            if context_parallel is not None:
                raise ValueError(f"attncomp: site {site.module_path or '<model>'} ({site.rule}) cannot run "
                                 "context-parallel: only softmax attention runs as ring attention")
            _rewrite_lowered(gm, site, i, parsed_strategy, records, moved, verify)
            continue
        requested = for_site(parsed_strategy, site.module_path)
        spec = analyze(site)
        if requested is None:
            records.append(SiteRecord(site.module_path, site.rule, "left",
                                      "no strategy pattern matches this module", spec))
            continue
        roles = prove_roles(site, gm)
        if isinstance(roles, str):
            records.append(SiteRecord(site.module_path, site.rule, "left", roles, spec))
            continue
        why = check_program(site, roles.scores)
        if why:
            records.append(SiteRecord(site.module_path, site.rule, "left", why, spec))
            continue
        uses, note = [], ()
        rec = recognise_masks(site, spec, memo, guards=guards)
        if isinstance(rec, str):
            note = (f"mask kept as a tensor: {rec}",) if spec.mask != Full() and not _causal_only(spec) else ()
        else:
            site.steps, uses = rec
            note = _symbolic_note(site, spec, uses)
            if site.sdpa.get("attn_mask") is not None:  # the kernel rebuilds it from the proof
                site.sdpa = {**site.sdpa, "attn_mask": None, "mask_from_proof": True}
            spec = analyze(site)
            spec = spec.with_(mask=mask_and(spec.mask, mask_of(uses)))
        plan = plan_site(spec, requested)
        if plan.variant == "kept":
            if context_parallel is None:  # the site's own nodes stay: nothing to gain
                records.append(SiteRecord(site.module_path, site.rule, "kept", "; ".join(plan.reasons), spec, plan))
                continue
            plan = plan.with_(variant="dense", reasons=("dense kernel (ring attention)",))
        plan = plan.with_(reasons=plan.reasons + note)
        steps, terms, masks = _terms_of(site, uses)
        m = site.anchor
        softmax_dtype = m.kwargs.get("dtype") if site.rule == "softmax_chain" else None
        kernel = AttentionKernel(plan, steps, (site.q.views, site.k.views, site.v.views), site.dropout,
                                 site.sdpa, site.kv_groups, site.module_path, softmax_dtype,
                                 site.v.out_views, masks=masks,
                                 approx=requested if plan.spec.contract == "approx" else None)
        if context_parallel is not None:
            plan = _ring(kernel, plan, steps, masks, site, context_parallel)
        # the eager form gets a proved mask rebuilt from its proof where the kernel's grid is the site's own
        # (4-D scores); otherwise the graph's mask node stays an input
        proved = ({u.src: j for j, u in enumerate(uses) if u.src is not None} if len(roles.q) == 4
                  else {})
        _insert_call(gm, site, kernel, (site.q.node, site.k.node, site.v.node, *terms), f"attncomp_site_{i}", moved,
                     verify and context_parallel is None, proved)
        records.append(SiteRecord(site.module_path, site.rule, "replaced", "; ".join(plan.reasons),
                                  spec, plan, kernel, roles))
    _rewrite_mha(gm, parsed_strategy, records, moved, verify, context_parallel)
    if any(r.kernel is not None and getattr(r.kernel, "masks", ()) for r in records):
        gm.graph.eliminate_dead_code()  # mask subgraphs no site reads any more
    gm.graph.lint()
    gm.recompile()
    return gm


def _eager_inputs(gm: fx.GraphModule, site, kernel, inputs: tuple, verify: bool, proved: dict) -> tuple:
    """Copy the site's own nodes into ``kernel`` (its eager form); returns the call's arguments: the
    fused path's ``inputs``, then the other nodes the eager form reads. A proved mask the graph will
    no longer compute is not passed: the kernel rebuilds it from the proof."""
    eager, reads = extract_region(gm, site.region, site.output)
    args, where = list(inputs), []
    for n in reads:
        if n in args:
            where.append(("arg", args.index(n)))
        elif n in proved:
            where.append(("mask", proved[n], getattr(T.meta(n), "dtype", None)))
        else:
            args.append(n)
            where.append(("arg", len(args) - 1))
    kernel.attach_eager(eager, tuple(where), len(inputs), verify)
    return tuple(args)


def _ring(kernel, plan: Plan, steps, masks, site, cp: ContextParallel) -> Plan:
    """Make ``kernel`` run its site as ring attention (context parallelism), or raise why it cannot."""
    why = None
    if any(m.keep_term is not None for m in masks) or any(isinstance(s, (AddBias, MaskFill)) for s in steps):
        why = "its scores carry a bias or a run-time mask"
    elif not all(isinstance(m.static, RING_MASKS) for m in masks) or len(masks) > 1:
        why = f"its mask {plan.spec.mask} is not one ring attention takes (none, causal, window, block-diagonal)"
    elif site.dropout[0] > 0:
        why = "it has attention dropout"
    elif plan.spec.contract == "approx":
        why = "an approximate strategy was requested for it"
    if why:
        raise ValueError(f"attncomp: site {site.module_path or '<model>'} cannot run context-parallel: {why}; "
                         "run locally it would attend within this rank's shard only")
    kernel.ring = cp.run
    kernel.plan = plan.with_(reasons=plan.reasons + (f"context parallel: ring attention ({cp.layout} layout; not "
                                                     "verified on the first call, whose eager form is local)",))
    return kernel.plan


def _insert_call(gm: fx.GraphModule, site, kernel, inputs: tuple, prefix: str, moved: dict, verify: bool = True,
                 proved: dict | None = None) -> None:
    """Call ``kernel`` on ``inputs`` in place of ``site``'s output and erase the site's region. An
    input that is the output of a site replaced earlier in this rewrite (attention reading another
    site's result) is read from that site's new call (``moved``, updated here)."""
    inputs = _eager_inputs(gm, site, kernel, inputs, verify, proved or {})
    inputs = tuple(moved.get(x, x) if isinstance(x, fx.Node) else x for x in inputs)
    name = prefix
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, kernel)
    with gm.graph.inserting_before(site.output):
        new = gm.graph.call_module(name, inputs)
    new.meta = dict(site.output.meta)
    site.output.replace_all_uses_with(new)
    moved[site.output] = new
    _erase_region(gm, site)


def _rewrite_lowered(gm: fx.GraphModule, site, i: int, parsed_strategy, records: list, moved: dict,
                     verify: bool) -> None:
    """A site that is its own kernel kind (``site.spec()``, ``site.kernel(plan, requested)``,
    ``site.inputs``): naive linear attention, tensor attention."""
    spec = site.spec()
    requested = for_site(parsed_strategy, site.module_path)
    if requested is None:
        records.append(SiteRecord(site.module_path, site.rule, "left", "no strategy pattern matches this module", spec))
        return
    plan = plan_site(spec, requested)
    kernel = site.kernel(plan, requested)
    _insert_call(gm, site, kernel, tuple(site.inputs), f"attncomp_site_{i}", moved, verify)
    records.append(SiteRecord(site.module_path, site.rule, "replaced", "; ".join(plan.reasons), spec, plan, kernel))


def _rewrite_mha(gm: fx.GraphModule, parsed_strategy, records: list, moved: dict, verify: bool,
                 context_parallel: ContextParallel | None = None) -> None:
    """Rule ``multihead_attention`` (``nn.MultiheadAttention`` / ``F.multi_head_attention_forward``)."""
    for i, node in enumerate(list(gm.graph.nodes)):
        if not T.is_op(node, T.MHA, gm):
            continue
        path = module_path(node) if node.op != "call_module" else str(node.target)
        res = match_mha(node, gm)
        COUNTERS[f"multihead_attention:{'miss' if isinstance(res, str) else 'hit'}"] += 1
        if isinstance(res, str):
            records.append(SiteRecord(path, "multihead_attention", "left", res))
            continue
        args, kw = res
        spec = mha_spec(node, args, kw)
        requested = for_site(parsed_strategy, path)
        if requested is None:
            records.append(SiteRecord(path, "multihead_attention", "left",
                                      "no strategy pattern matches this module", spec))
            continue
        if context_parallel is not None:
            raise ValueError(f"attncomp: site {path or '<model>'} (nn.MultiheadAttention) cannot run context-parallel "
                             "yet: write the attention with F.scaled_dot_product_attention or an explicit softmax")
        plan = plan_site(spec, requested)
        kernel = MHAKernel(plan, path=path, **kw)
        _insert_call(gm, SimpleNamespace(region=[node], output=node), kernel, tuple(args), f"attncomp_mha_{i}",
                     moved, verify)
        records.append(SiteRecord(path, "multihead_attention", "replaced", "; ".join(plan.reasons),
                                  spec, plan, kernel))
