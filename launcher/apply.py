"""Carry out a :class:`~streampipe.launcher.plan.Plan` inside the running supervisor, losing nothing.

The order (each step an ``apply`` event in ``streampipe events``):

1. supervisor settings of unchanged stages, in place (restart policy, limits, timeouts);
2. the wiring switches to the new config; the edges it drops stay *draining*: their consumers
   keep acknowledging the old producers until step 6;
3. new stages start, downstream first, each READY (or failed, or timed out) before the next;
   the consumers of a new stage learn its acknowledgement addresses first;
4. ``replicas`` changes go through the ``scale`` path (new replicas with the new config);
5. stages whose ``type``, ``options`` or data-plane settings changed, or whose outputs changed
   (a consumer was added, removed or rewired), restart replica by replica with the new spec,
   each READY before the next stops. A replica stopping drains: what it holds unacknowledged is
   redelivered by its producer (or replayed from the committed position, for a source) to
   whichever consumer the new wiring names; the sink's exact dedup drops what arrives twice;
6. removed stages, sources first: no producer sends to them any more (step 5), so each drains
   what it holds to its consumers, which acknowledge it, and stops;
7. the draining edges are dropped and every consumer learns its final acknowledgement peers.

A failure stops the apply where it is (an event says which step); what was done stays done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loguru import logger

from streampipe.launcher.config import PipelineConfig
from streampipe.launcher.errors import ControlError
from streampipe.launcher.plan import Plan, make_plan
from streampipe.launcher.watcher import Watcher

if TYPE_CHECKING:
    from streampipe.launcher.supervisor import Supervisor


async def apply_config(sup: Supervisor, new: PipelineConfig, dry_run: bool = False) -> dict[str, Any]:
    """Plan the change from the running config to ``new`` and, unless ``dry_run``, carry it out.

    The reply carries the plan; ``refused`` lists what cannot change live (then nothing changes).
    """
    if not sup.started:
        raise ControlError("the pipeline is still starting: apply once `up` has started every stage")
    async with sup.apply_lock:
        # against what runs: a stage `streampipe scale` moved off its count goes to the file's count
        plan = make_plan(sup.cfg, new, running={name: len(w.replicas) for name, w in sup.watchers.items()})
        reply: dict[str, Any] = {"ok": True, "plan": plan.to_dict(), "refused": plan.refusals, "applied": False}
        if dry_run or plan.refusals or plan.empty or sup.stopping:
            if plan.refusals and not dry_run:
                assert sup.events is not None
                sup.events.emit("apply", reason=f"refused {new.path}: " + "; ".join(plan.refusals))
            return reply
        try:
            await _carry_out(sup, plan, new)
        finally:
            sup.wiring.retired, sup.wiring.draining = None, []
        reply["applied"] = True
        return reply


async def _carry_out(sup: Supervisor, plan: Plan, new: PipelineConfig) -> None:
    events = sup.events
    assert events is not None

    def step(stage: str | None, reason: str) -> None:
        logger.info(f"apply: {stage or 'pipeline'}: {reason}")
        events.emit("apply", stage or "", None, None, reason=reason)

    old = sup.cfg
    step(None, f"applying {new.path}: {len(plan.steps())} steps")
    # 1. in place
    for key, (was, now) in plan.pipeline.items():
        step(None, f"{key}: {was!r} -> {now!r} (in place)")
    for change in plan.changed.values():
        if change.settings:
            update = {k: v for k, (_, v) in change.settings.items()}
            for rep in sup.watchers[change.name].replicas:
                rep.retune(rep.cfg.model_copy(update=update))
            step(change.name, "settings in place: " + ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in change.settings.items()))
    for name, n in plan.recorded.items():
        step(name, f"{n} replicas, as `streampipe scale` set them: the config now says so")
    # 2. the new wiring; the old edges drain
    new_edges = set(new.edges())
    sup.wiring.retired, sup.wiring.draining = old, [e for e in old.edges() if e not in new_edges]
    for name in plan.added:
        sup.watchers[name] = Watcher(sup, name, new.stages[name])
    sup.cfg = new
    # 3. new stages, downstream first; their consumers acknowledge them from their first batch
    for name in plan.added:
        sup.wiring.announce_ack_peers(name)
    for change in plan.changed.values():
        if change.inputs:
            _tell_peers(sup, change.name)
            step(change.name, f"inputs {change.inputs[0]} -> {change.inputs[1]}: acknowledges both while the old drain")
    for name in plan.added:
        await sup.watchers[name].start()
        await sup.watchers[name].settle()
        step(name, f"added: {len(sup.watchers[name].replicas)} replicas started")
    # 4. replicas
    for change in plan.changed.values():
        if change.replicas:
            target = new.stages[change.name] if change.needs_restart else None
            await sup.watchers[change.name].scale(change.replicas[1], target)
            step(change.name, f"scaled {change.replicas[0]} -> {change.replicas[1]} replicas")
    # 5. rolling restarts: new spec, new outputs (downstream first: consumers are READY before producers move)
    order = new.downstream_first()
    for name in sorted((c.name for c in plan.changed.values() if c.needs_restart), key=order.index):
        change = plan.changed[name]
        why = list(change.restart) + (["outputs"] if change.outputs else [])
        step(name, f"rolling restart ({', '.join(why)} changed)")
        reply = await sup.watchers[name].restart(new.stages[name])
        if not reply.get("ok"):
            raise RuntimeError(f"rolling restart of {name} failed: {reply.get('error')}")
        step(name, f"restarted: {len(sup.watchers[name].replicas)} replicas run the new spec")
    # 6. removed stages, sources first: nothing sends to them now; they drain and stop
    for name in plan.removed:
        watcher = sup.watchers[name]
        step(name, f"removing: draining and stopping {len(watcher.replicas)} replicas")
        await watcher.remove("removed by apply")
        del sup.watchers[name]
        step(name, "removed")
    # 7. the old edges are gone: final acknowledgement peers
    sup.wiring.retired, sup.wiring.draining = None, []
    for change in plan.changed.values():
        if change.inputs:
            _tell_peers(sup, change.name)
    step(None, f"applied {new.path}")


def _tell_peers(sup: Supervisor, stage: str) -> None:
    acks = sup.wiring.ack_peers(stage)
    for rep in sup.watchers[stage].replicas:
        sup.tell(rep, "peers", acks=acks)

