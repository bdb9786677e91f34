// Capture the real Vercel AI SDK's OpenTelemetry spans as OTLP/HTTP JSON (not run by the suite:
// it needs npm). Run by hand:
//
//   mkdir /tmp/vercel && cd /tmp/vercel && npm init -y && npm install ai @ai-sdk/openai \
//     @ai-sdk/anthropic @opentelemetry/api @opentelemetry/sdk-trace-base \
//     @opentelemetry/exporter-trace-otlp-http @opentelemetry/resources
//   LLM_BASE=http://127.0.0.1:<fake llm port> CAPTURE=http://127.0.0.1:<capture port>/v1/traces \
//     node tests/payloads/capture_vercel.mjs
//
// tests/payloads/capture_vercel.py starts the fake LLM (tests/fake_provider.py) and the capture
// server, runs this, and writes tests/payloads/vercel-ai-<version>-otlp.json.
import { generateText, streamText, embed } from "ai";
import { createOpenAI } from "@ai-sdk/openai";
import { createAnthropic } from "@ai-sdk/anthropic";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";

const exporter = new OTLPTraceExporter({ url: process.env.CAPTURE });
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": "vercel-app" }),
  spanProcessors: [new SimpleSpanProcessor(exporter)],
});
const tracer = provider.getTracer("ai");
const openai = createOpenAI({ baseURL: process.env.LLM_BASE + "/v1", apiKey: "sk-test" });
const anthropic = createAnthropic({ baseURL: process.env.LLM_BASE + "/v1", apiKey: "sk-ant" });
const telemetry = (userId) => ({
  isEnabled: true, tracer, functionId: "answer", metadata: { userId, feature: "faq" },
});

await generateText({ model: openai.chat("gpt-4o-mini"), prompt: "capital of France?",
  experimental_telemetry: telemetry("alice") });
const s = streamText({ model: anthropic("claude-sonnet-4-5"), prompt: "capital of France?",
  experimental_telemetry: telemetry("bob") });
for await (const _ of s.textStream) { /* drain */ }
await embed({ model: openai.embedding("text-embedding-3-small"), value: "hello",
  experimental_telemetry: telemetry("carol") });
try {
  await generateText({ model: openai.chat("gpt-4o-broken"), prompt: "fail", maxRetries: 0,
    experimental_telemetry: telemetry("alice") });
} catch (e) { console.log("failure as expected:", e.name); }
await provider.forceFlush();
await provider.shutdown();
