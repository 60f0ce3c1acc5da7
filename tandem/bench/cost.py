"""The cost model: dollars per engine-hour for each tier, turned into dollars per million tokens.

Engine-seconds are the seconds an engine had work (the edge's llama.cpp slots
busy, the cloud's vLLM engine busy), so an idle machine costs nothing here; a
fleet that pays for idle time would add it at the fleet level. The defaults
are illustrative and stated in every report: a cloud engine priced like one
on-demand vCPU-hour, an edge engine priced at the energy of a device the
user already owns. Change them with ``--edge-usd-per-hour``/``--cloud-usd-per-hour``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CostModel(BaseModel):
    """Dollars per engine-hour of each tier."""

    model_config = ConfigDict(extra="forbid")

    edge_usd_per_engine_hour: float = Field(default=0.005, ge=0)
    cloud_usd_per_engine_hour: float = Field(default=0.05, ge=0)

    def usd(self, edge_engine_s: float, cloud_engine_s: float) -> float:
        """Dollars for the given engine-seconds of each tier."""
        return (
            edge_engine_s * self.edge_usd_per_engine_hour
            + cloud_engine_s * self.cloud_usd_per_engine_hour
        ) / 3600.0

    def usd_per_million_tokens(
        self, edge_engine_s: float, cloud_engine_s: float, tokens: int
    ) -> float | None:
        """Dollars per million tokens served; None when no token was served."""
        if tokens <= 0:
            return None
        return self.usd(edge_engine_s, cloud_engine_s) * 1e6 / tokens
