"""Operations routes.

    GET /health  liveness + readiness (open even with an API key)
    GET /stats   workers, queue depth, active sequences, tokens served (the scheduler's stats;
                 {"detail": ...} 401 without the API key)
"""
from fastapi import APIRouter, Request

from nanopipe.serving.state import UNAUTHORIZED, StateDep, detail_error

router = APIRouter()


@router.get("/health")
async def health(state: StateDep):
    scheduler = state.scheduler
    stats = scheduler.stats() if scheduler.started else None
    return {"status": "ok", "ready": bool(scheduler.started), "num_gpus": len(scheduler.workers),
            "available_workers": stats["available_workers"] if stats else 0}


@router.get("/stats")
async def stats(request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    return state.scheduler.stats()
