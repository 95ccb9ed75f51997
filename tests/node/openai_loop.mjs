// The streaming loop from OpenAI's Node tutorial, against the gateway:
//   node openai_loop.mjs BASE_URL MODEL
// Prints the text; a chunk without choices would crash it (TypeError), as it would a user's.
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Hello there" }],
  stream: true,
});
let text = "";
for await (const chunk of stream) {
  text += chunk.choices[0].delta.content || "";
}
process.stdout.write(text);
