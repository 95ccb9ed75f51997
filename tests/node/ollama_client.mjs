// The npm `ollama` client against the gateway: node ollama_client.mjs HOST MODEL
// Prints what it got as one JSON object.
import { Ollama } from "ollama";

const [host, model] = process.argv.slice(2);
const client = new Ollama({ host });
const messages = [{ role: "user", content: "Hello there" }];
const out = {};
out.names = (await client.list()).models.map((m) => m.name);
let streamed = "";
for await (const part of await client.chat({ model, messages, stream: true })) {
  streamed += part.message.content;
}
out.streamed = streamed;
out.whole = (await client.chat({ model, messages })).message.content;
const tools = [{ type: "function", function: { name: "get_weather", parameters: {
  type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
const call = (await client.chat({ model, messages, tools })).message.tool_calls[0].function;
out.tool = { name: call.name, arguments: call.arguments };
out.generated = (await client.generate({ model, prompt: "Once" })).response;
try {
  await client.chat({ model: "no-such-model", messages });
} catch (error) {
  out.missing = { status: error.status_code, error: error.error };
}
process.stdout.write(JSON.stringify(out));
