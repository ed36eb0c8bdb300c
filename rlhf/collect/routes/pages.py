"""The server-rendered pages: judging (and its form post), the guidelines and the admin overview."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Form, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from rlhf.collect.routes.auth import Caller, admin, caller
from rlhf.collect.routes.state import CollectState, JudgmentIn, get_state, safe_errors

router = APIRouter()


def prompt_turns(prompt) -> list[tuple[str, str]]:
    """A stored prompt as (role, text) turns: chat prompts keep their roles, a plain string is one 'prompt' turn."""
    if isinstance(prompt, list):
        return [(str(m.get("role", "?")), str(m.get("content", ""))) for m in prompt if isinstance(m, dict)]
    return [("prompt", str(prompt))]


@router.get("/", response_class=HTMLResponse)
def judge_page(who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    item = state.assigner.next_for(who.annotator.id)
    counts = state.store.pair_counts()
    return state.render(
        "judge.html",
        item=item,
        turns=prompt_turns(item.prompt) if item else [],
        me=who.annotator,
        csrf=state.csrf_for(who),
        mine=state.store.count_judgments(who.annotator.id),
        overall=counts["regular_judgments"],
        target=counts["pairs"] * state.cfg.assignment.overlap,
        empty_status=None if item else state.status_when_empty(),
        feeder_error=state.feeder.error if state.feeder else None,
        max_rationale=state.cfg.server.max_rationale_chars,
    )


@router.post("/judge")
def judge_form(
    who: Caller = Depends(caller),
    assignment_id: str = Form(..., max_length=64),
    choice: Literal["left", "right", "tie", "both_bad"] = Form(...),
    strength: str = Form(""),
    rationale: str = Form(""),
    state: CollectState = Depends(get_state),
):
    if strength not in ("", "1", "2", "3"):
        raise HTTPException(422, "strength must be 1, 2 or 3")
    try:
        item = JudgmentIn(assignment_id=assignment_id, choice=choice, strength=int(strength) if strength else None,
                          rationale=rationale)
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in safe_errors(exc.errors()))) from None
    state.store_judgment(who, item)
    return RedirectResponse("/", status_code=303)


@router.get("/guidelines", response_class=HTMLResponse)
def guidelines_page(who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    return state.render("guidelines.html", me=who.annotator, csrf=state.csrf_for(who), guidelines=state.guidelines)


@router.get("/admin", response_class=HTMLResponse)
def admin_page(who: Caller = Depends(admin), state: CollectState = Depends(get_state)):
    return state.render("admin.html", me=who.annotator, csrf=state.csrf_for(who), stats=state.stats(),
                        feeder=state.feeder, overlap=state.cfg.assignment.overlap)
