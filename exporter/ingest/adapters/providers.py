"""The provider of a model id, inferred before pricing when a report does not name one.

Gateways pass model ids in their own spellings: LiteLLM-style prefixes (`openai/gpt-4o`,
`anthropic/claude-sonnet-4-5`, `bedrock/…`, `vertex_ai/…`), Bedrock ids
(`anthropic.claude-3-5-sonnet-20240620-v1:0`, `us.anthropic.…`), Vertex ids
(`claude-3-5-sonnet@20240620`, `publishers/google/models/gemini-2.0-flash`). Without a
provider the price lookup misses and the call silently costs $0.
"""

from __future__ import annotations

import re

__all__ = ["canonical_provider", "infer"]

#: provider spellings of SDKs, OTel semconv and LiteLLM → genai-prices provider ids
_PROVIDER_ALIASES = {
    "openai": "openai",
    "azure": "azure",
    "azure_ai": "azure",
    "az.ai.openai": "azure",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "anthropic": "anthropic",
    "aws.bedrock": "aws",
    "bedrock": "aws",
    "bedrock_converse": "aws",
    "aws": "aws",
    "amazon-bedrock": "aws",
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "gcp.gen_ai": "google",
    "vertex_ai": "google",
    "vertex_ai_beta": "google",
    "vertex": "google",
    "google": "google",
    "gemini": "google",
    "google.generative-ai": "google",
    "google-vertex": "google",
    "mistral": "mistral",
    "mistral_ai": "mistral",
    "groq": "groq",
    "deepseek": "deepseek",
    "cohere": "cohere",
    "cohere_chat": "cohere",
    "x_ai": "x-ai",
    "xai": "x-ai",
    "x-ai": "x-ai",
    "perplexity": "perplexity",
    "together_ai": "together",
    "together": "together",
    "fireworks_ai": "fireworks",
    "fireworks": "fireworks",
    "openrouter": "openrouter",
    "cerebras": "cerebras",
    "moonshot": "moonshotai",
}
_BEDROCK = re.compile(
    r"^(?:(?:us|eu|apac|global|us-gov|ca|jp|au)\.)?"
    r"(?:anthropic|amazon|meta|mistral|cohere|ai21|deepseek|openai|qwen|writer)\.[\w.-]+(?::\d+)?$"
)
_VERTEX_PATH = re.compile(r"^(?:projects/[^/]+/locations/[^/]+/)?publishers/([\w-]+)/models/(.+)$")
#: bare model families whose provider is not in doubt
_FAMILIES = (
    ("claude", "anthropic"),
    ("gpt-", "openai"),
    ("chatgpt-", "openai"),
    ("text-embedding-", "openai"),
    ("o1", "openai"),
    ("o3", "openai"),
    ("o4", "openai"),
    ("gemini", "google"),
    ("mistral", "mistral"),
    ("codestral", "mistral"),
    ("grok", "x-ai"),
    ("deepseek", "deepseek"),
    ("command", "cohere"),
)


def canonical_provider(provider: str) -> str:
    """One spelling per provider, so labels and prices agree across clients."""
    key = provider.strip().lower()
    return _PROVIDER_ALIASES.get(key, key)


def infer(model: str, provider: str) -> tuple[str, str]:
    """(model, provider) with a known provider prefix moved from the model id to the provider.

    A prefix is only taken off when the report names no provider or the same one, so an
    OpenRouter id (`anthropic/claude-…` with provider openrouter) is left as it is."""
    given = canonical_provider(provider) if provider else ""
    if "/" in model:
        head, rest = model.split("/", 1)
        prefix = _PROVIDER_ALIASES.get(head.lower())
        if prefix is not None and rest and given in ("", prefix, "litellm"):
            if prefix == "openrouter":
                return rest, prefix
            return infer(rest, prefix)
        match = _VERTEX_PATH.match(model)
        if match and not given:
            return match.group(2), "google"
    if given:
        return model, given
    lower = model.lower()
    if _BEDROCK.match(lower):
        return model, "aws"
    if "@" in lower and lower.startswith(("claude", "gemini")):
        return model, "google"  # Vertex AI's `model@version`
    for family, name in _FAMILIES:
        if lower.startswith(family):
            return model, name
    return model, ""
