"""QIDO-RS search use cases: the local search through the gate, and the federated one.

The gate filters the index to what the caller may see and writes the audit record in the
same transaction; a federated search adds the peers' answers for the one patient it
names (``services.federation.federated_search``), under the caller's consent grant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from imaging_gateway.dicom.dicomjson import to_dicom_json
from imaging_gateway.domain.qido import Level, QidoPage, QidoQuery, parse_qido
from imaging_gateway.federation.fanout import warning_header
from imaging_gateway.security.access import AccessContext
from imaging_gateway.security.consent import ConsentStore
from imaging_gateway.security.gate import Gate
from imaging_gateway.services.federation import FederatedPage, Federation, federated_search

__all__ = ["FederatedPage", "SearchService", "warning_header"]


@dataclass(frozen=True, slots=True)
class SearchService:
    """Search for studies, series and instances (one per app)."""

    gate: Gate
    consents: ConsentStore
    max_results: int
    federation: Federation | None = None
    """Set only when ``[federation] enabled = true``."""

    async def search(self, ctx: AccessContext, query: QidoQuery) -> QidoPage:
        """The studies / series / instances of ``query`` the caller may see, audited.

        Raises what ``Gate.search`` raises (``InvalidQuery``, ``QueryTooBroad``,
        ``IndexUnavailable``).
        """
        return await self.gate.search(ctx, query, max_results=self.max_results)

    async def federated_search(
        self,
        ctx: AccessContext,
        level: Level,
        pairs: Sequence[tuple[str, str]],
        *,
        study_uid: str | None,
        series_uid: str | None,
        retrieve_base: str,
    ) -> FederatedPage:
        """The local search plus every peer's answer for the patient named by PatientID.

        ``pairs``: the caller's query parameters without ``federated``; ``ctx`` carries
        the correlation id both provinces audit with. The page's warnings hold the local
        search's and the peers'. Raises ``InvalidQuery`` and ``IndexUnavailable``; never
        for a peer's failure.
        """
        query = parse_qido(level, pairs, study_uid=study_uid, series_uid=series_uid)
        max_results = self.max_results
        limit = min(query.limit or max_results, max_results)
        offset = query.offset
        # Every source is asked for its first offset + limit matches; the merge pages.
        local_pairs = [(k, v) for k, v in pairs if k not in ("limit", "offset")]
        local_pairs.append(("limit", str(min(offset + limit, max_results))))
        local_query = parse_qido(level, local_pairs, study_uid=study_uid, series_uid=series_uid)
        page = await self.gate.search(ctx, local_query, max_results=max_results)
        local = to_dicom_json(
            level, page.rows, includefield=query.requested, retrieve_base=retrieve_base
        )
        answer = await federated_search(
            federation=self.federation,
            gate=self.gate,
            consents=self.consents,
            ctx=ctx,
            level=level,
            query=query,
            pairs=pairs,
            local=local,
            limit=limit,
            offset=offset,
            study_uid=study_uid,
            series_uid=series_uid,
            retrieve_base=retrieve_base,
        )
        return replace(answer, warnings=(*page.warnings, *answer.warnings))
