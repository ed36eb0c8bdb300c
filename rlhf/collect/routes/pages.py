"""The server-rendered pages: judging (and its form posts: judge, skip, undo), the prompt's image, the guidelines and
the admin overview."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Form, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from pydantic import ValidationError

from rlhf.collect.routes.auth import Caller, admin, caller
from rlhf.collect.routes.state import CollectState, JudgmentIn, get_state, safe_errors

router = APIRouter()
RECENT_RATIONALES = 50  # the admin page lists this many of the latest non-empty rationales
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}  # what /image serves, by the file's extension


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
        target=state.judgment_target(counts),
        empty_status=None if item else state.status_when_empty(),
        max_rationale=state.cfg.server.max_rationale_chars,
    )


@router.get("/image/{assignment_id}/{index}")
def assignment_image(assignment_id: str, index: int, who: Caller = Depends(caller),
                     state: CollectState = Depends(get_state)):
    """The `index`-th image of the prompt of one of the caller's own assignments. The client names an assignment,
    never a file: the file is the one the pair store holds for that pair (put there by the pair source), so no
    request reaches anything else on disk, and another annotator's assignment id gets 404 like an unknown one."""
    path = state.store.assignment_image(who.annotator.id, assignment_id[:64], index)
    if path is None:
        raise HTTPException(404, "no such image")
    file = Path(path)
    media_type = IMAGE_TYPES.get(file.suffix.lower())
    if media_type is None or not file.is_file():
        raise HTTPException(404, "the image file is not available")
    return FileResponse(file, media_type=media_type)


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


@router.post("/skip")
def skip_form(who: Caller = Depends(caller), assignment_id: str = Form(..., max_length=64),
              state: CollectState = Depends(get_state)):
    state.store.skip(who.annotator.id, assignment_id)  # an unknown or finished one: nothing to pass on
    return RedirectResponse("/", status_code=303)


@router.post("/undo")
def undo_form(who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    if state.store.undo_last(who.annotator.id, state.cfg.assignment.lease_seconds) is None:
        raise HTTPException(409, "nothing to undo: you have no judgment from the last "
                                 f"{state.cfg.assignment.lease_seconds:g} seconds")
    return RedirectResponse("/", status_code=303)


@router.get("/guidelines", response_class=HTMLResponse)
def guidelines_page(who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    return state.render("guidelines.html", me=who.annotator, csrf=state.csrf_for(who), guidelines=state.guidelines)


@router.get("/admin", response_class=HTMLResponse)
def admin_page(who: Caller = Depends(admin), state: CollectState = Depends(get_state)):
    rows = state.store.judgment_rows()
    rationales = [r for r in reversed(rows) if r["rationale"].strip()][:RECENT_RATIONALES]
    return state.render("admin.html", me=who.annotator, csrf=state.csrf_for(who), stats=state.stats(rows),
                        feeder=state.feeder, overlap=state.cfg.assignment.overlap, rationales=rationales)
