"""The service's one settings object, read from the environment once at start-up.

Every variable takes the `CLIPSEARCH_` prefix; the two the deployment docs use most also work without
it (`ARTIFACTS_DIR`). A bad value stops the process at start-up with pydantic's
message instead of surfacing in the first request.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clipsearch.artifacts import check_collection_name
from clipsearch.store import EXACT_MAX, check_store_spec

from app.fetch import Allowlist, Networks

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIPSEARCH_", populate_by_name=True, extra="ignore",
                                      frozen=True)

    artifacts_dir: Path = Field(
        Path("artifacts"),
        validation_alias=AliasChoices("CLIPSEARCH_ARTIFACTS_DIR", "ARTIFACTS_DIR"),
        description="Root of the offline pipeline's output (embeddings/, indexes/, models/).")
    collections: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated collections to serve; empty (the default) "
                                          "serves every collection under ARTIFACTS_DIR/collections.")
    default_collection: str | None = Field(
        None, description="The collection a request without `collection` searches; default: the "
                          "first of `collections` (alphabetical when they are discovered).")
    images_dir: Path | None = Field(
        None, description="Serve image files from this folder (by file name) instead of the "
                          "paths recorded in the collections, e.g. inside a container.")
    device: str = Field("auto", description="torch device for the model: auto, cpu, cuda, cuda:1 ...")

    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1, le=10_000)
    max_query_chars: int = Field(1000, ge=1, le=100_000)
    max_upload_bytes: int = Field(10 * MiB, ge=1024)
    max_image_pixels: int = Field(25_000_000, ge=1)
    query_image_tta: bool = Field(
        False, description="Embed an image *query* with the model's test-time augmentation too (the "
                           "offline model's mirror average: twice the image compute per search). Off: a "
                           "search embeds its image plain, once; stored images always get it. On val, "
                           "plain uploads find captions 2.4 points R@1 worse with lit-effnet1-minilm "
                           "(docs/offline_model.md).")
    max_offset: int = Field(10_000, ge=0, description="Deepest result a page may start at (pagination).")
    thumbnail_px: int = Field(256, ge=32, le=1024, description="Longest side of GET /thumbnails images.")
    thumbnail_cache_size: int = Field(2048, ge=0, description="Thumbnails kept in memory (LRU entries).")
    hnsw_m: int = Field(16, ge=2, description="HNSW M for collections large enough to use HNSW.")
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(100, ge=8)
    exact_max: int = Field(
        EXACT_MAX, ge=0, description="A target (images or captions) of a collection with at most this many "
                                     "vectors is searched exactly; above it, by HNSW (loaded from the "
                                     "collection's snapshot when it is current, else built at start-up).")

    max_embed_texts: int = Field(64, ge=1, le=4096, description="Most texts one POST /embed/text takes.")
    fetch_urls: bool = Field(
        False, description="Accept {\"image_url\": ...} in JSON image queries: the service fetches the "
                           "image itself (http/https, public addresses only, see docs/limits.md). Off by "
                           "default: an image-fetching server is an SSRF risk.")
    fetch_allowlist: Annotated[Allowlist, NoDecode] = Field(
        default_factory=list, description="Comma-separated hosts image URLs may name (exact names/IPs or "
                                          "*.example.com); empty admits any public host.")
    fetch_connect_timeout_s: float = Field(3.0, gt=0, le=60, description="Per connection attempt.")
    fetch_total_timeout_s: float = Field(10.0, gt=0, le=300,
                                         description="Whole fetch: DNS, every redirect, the body.")
    fetch_max_redirects: int = Field(3, ge=0, le=10)
    fetch_allowed_private_networks: Annotated[Networks, NoDecode] = Field(
        default_factory=list, description="Comma-separated non-public CIDRs image URLs may reach anyway "
                                          "(an internal image store); metadata addresses stay refused.")
    store: str = Field(
        "faiss", description="Where the collections live: faiss (the embedded FAISS + SQLite store under "
                             "ARTIFACTS_DIR, the default), a Qdrant URL (http://qdrant:6333) or qdrant:PATH "
                             "(qdrant-client's local mode in that folder; one process at a time).")
    qdrant_api_key: SecretStr | None = Field(None, description="API key of the Qdrant server (CLIPSEARCH_STORE=URL).")

    cache_size: int = Field(1024, ge=0, description="Response LRU entries; 0 turns the cache off.")
    inference_threads: int = Field(2, ge=1, description="Worker threads for decode + encode + search.")
    text_backend: Literal["onnx", "torch"] = Field(
        "onnx", description="Query text encoder: ONNX Runtime export of the text tower (open_clip CLIP, "
                            "truncated, or Hugging Face, e.g. lit-effnet-minilm's MiniLM), or torch. "
                            "Models without an exportable tower use torch either way.")
    image_backend: Literal["auto", "onnx", "bf16", "torch"] = Field(
        "auto", description="Query image encoder: onnx = ONNX Runtime export of a timm or ViT image tower "
                            "(e.g. lit-effnet-minilm's EfficientNet, ViT-B-32); bf16 = a bf16 copy of the "
                            "image tower (self-checked against fp32, else onnx); auto = bf16 for a ViT tower "
                            "on a CPU with AMX-BF16, else onnx; torch. Other image towers use torch either way.")
    onnx_cache_dir: Path = Field(Path(tempfile.gettempdir()) / "clipsearch-onnx",
                                 description="Where the ONNX exports are cached (must be writable).")
    text_batch_size: int = Field(16, ge=1, le=256,
                                 description="Most text queries encoded in one forward pass when they "
                                             "arrive while the encoder is busy; 1 turns batching off.")
    image_batch_size: int = Field(8, ge=1, le=64,
                                  description="Most image queries encoded in one forward pass when they "
                                              "arrive while the image encoder is busy; 1 turns batching off.")
    image_threads: int | None = Field(
        None, ge=1, description="Intra-op threads of the image tower's ONNX session; default: every CPU "
                                "core, so a lone image query uses the machine (image batches then run "
                                "one at a time).")
    max_in_flight: int = Field(16, ge=1, description="Search requests admitted at once; more get 429.")
    torch_threads: int | None = Field(
        None, ge=1, description="Intra-op threads per inference call (torch and faiss); "
                                "default: CPU cores / inference_threads.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header sent with 429 and 503.")
    verify_index_checksum: bool = Field(True, description="sha256-check index files at start-up.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated allowed origins; empty turns CORS off.")
    admin_token: SecretStr | None = Field(
        None, min_length=16,
        description="Bearer token for POST /admin/reload; unset (the default) leaves the route out.")
    reload_on_sighup: bool = Field(
        True, description="SIGHUP reloads model and indexes in the background and swaps them in "
                          "once loaded; the old ones serve until then and stay if the load fails.")

    # -- live writes (POST/DELETE/PUT /collections/{name}/media...) ------------------------------
    write_token: SecretStr | None = Field(
        None, min_length=16,
        description="Bearer token for the write routes (upload, delete, caption replace, compact); unset "
                    "(the default) leaves them out and opens the collections read-only.")
    write_max_in_flight: int = Field(2, ge=1, description="Writes admitted at once; more get 429. Their "
                                                          "encoding shares the inference pool with searches.")
    max_captions: int = Field(32, ge=0, le=1000, description="Most captions one uploaded item may carry.")
    max_metadata_bytes: int = Field(16384, ge=2, description="Largest `metadata` JSON of an upload.")
    refresh_interval_ms: int = Field(
        1000, ge=0, description="How often the served collections look for commits made by other processes "
                                "(an offline ingest into a served collection); 0 turns the poll off.")
    compact_tombstones: int = Field(
        1000, ge=0, description="Deleted or replaced rows that start a background compaction; 0: never automatic.")
    compact_delta: int = Field(
        5000, ge=0, description="Rows added after an HNSW graph was built that start a background compaction "
                                "(they are searched exactly until then); 0: never automatic.")

    # -- access (app/auth.py, clipsearch/keys.py, docs/security.md) -------------------------------
    api_key: SecretStr | None = Field(None, min_length=16, description="One admin API key from the environment.")
    api_keys_file: Path | None = Field(
        None, description="Keys file (name:scope:sha256 a line; `python -m offline keys add`), re-read "
                          "when it changes and on SIGHUP.")
    auth: Literal["on", "off"] = Field(
        "on", description="off: no keys asked of anyone (a trusted network only; logged loudly). on: with "
                          "no key configured only loopback clients are answered.")
    writes: bool = Field(False, description="Open the collections writable and mount the write routes "
                                            "(scope write); CLIPSEARCH_WRITE_TOKEN set implies it.")
    metrics_public: bool = Field(False, description="Serve /metrics without a key (e.g. to a Prometheus "
                                                    "on a private network); otherwise it needs scope read.")
    session_secret: SecretStr | None = Field(
        None, min_length=32, description="Signs the search page's session cookies; default: random per "
                                         "process (a restart signs everyone out).")
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a page sign-in lasts.")
    cookie_secure: bool = Field(False, description="Mark the session cookie Secure even when the request "
                                                   "reached the app over plain http (TLS ends at a proxy).")
    auth_failures_per_minute: int = Field(
        10, ge=1, description="Wrong keys one client may send a minute before it gets 429 + Retry-After.")

    @property
    def writes_enabled(self) -> bool:
        return self.writes or self.write_token is not None

    @field_validator("cors_origins", "collections", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        return check_store_spec(value)

    @field_validator("collections")
    @classmethod
    def _check_collections(cls, value: list[str]) -> list[str]:
        for name in value:
            check_collection_name(name)
        if len(set(value)) != len(value):
            raise ValueError(f"collections {value} names a collection twice")
        return value

    @field_validator("default_collection", mode="before")
    @classmethod
    def _check_default(cls, value: Any) -> Any:
        if isinstance(value, str):  # an empty variable (compose's `${VAR:-}`) means "not set"
            return check_collection_name(value.strip()) if value.strip() else None
        return value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.collections and self.default_collection and self.default_collection not in self.collections:
            raise ValueError(f"default_collection {self.default_collection!r} is not one of collections "
                             f"({', '.join(self.collections)})")
        if self.fetch_connect_timeout_s > self.fetch_total_timeout_s:
            raise ValueError("fetch_connect_timeout_s must not exceed fetch_total_timeout_s")
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must not exceed max_k ({self.max_k})")
        if self.torch_threads is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            object.__setattr__(self, "torch_threads", max(1, (cores or 1) // self.inference_threads))
        if self.image_threads is None:
            object.__setattr__(self, "image_threads", max(1, cpu_cores()))
        return self


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
