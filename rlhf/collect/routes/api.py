"""The JSON API: the next assignment, posting a judgment, and the admin's stats."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rlhf.collect.routes.auth import Caller, admin, caller
from rlhf.collect.routes.state import CollectState, JudgmentIn, get_state

router = APIRouter(prefix="/api")


@router.get("/next")
def api_next(who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    item = state.assigner.next_for(who.annotator.id)
    if item is None:
        return {"assignment": None, "status": state.status_when_empty()}
    return {
        "assignment": {"id": item.id, "prompt": item.prompt, "left": item.left, "right": item.right,
                       "images": [f"/image/{item.id}/{n}" for n in range(item.images)]},
        "guidelines_version": state.version,
        "status": "ok",
    }


@router.post("/judgments")
def api_judgment(item: JudgmentIn, who: Caller = Depends(caller), state: CollectState = Depends(get_state)):
    judgment_id, duplicate = state.store_judgment(who, item)
    return JSONResponse({"judgment_id": judgment_id, "duplicate": duplicate}, status_code=200 if duplicate else 201)


@router.get("/stats")
def api_stats(who: Caller = Depends(admin), state: CollectState = Depends(get_state)):
    return state.stats()
