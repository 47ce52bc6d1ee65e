/**
 * Endpoint URLs and browser authentication for a Realtime server, from one base URL.
 *
 * `url` may be the server origin (`http://localhost:8000`), its `/v1` base, or the realtime
 * endpoint itself, over http(s) or ws(s): every form names the same two endpoints.
 */

const SUFFIXES = ["/v1/realtime/calls", "/v1/realtime", "/v1"];

/** The server's base URL (scheme, host, optional path prefix), without the `/v1...` part. */
export function serverBase(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError(`invalid server url ${JSON.stringify(url)}: expected e.g. "http://localhost:8000"`);
  }
  if (!["http:", "https:", "ws:", "wss:"].includes(parsed.protocol)) {
    throw new TypeError(`server url must be http(s) or ws(s), got ${parsed.protocol} in ${url}`);
  }
  let path = parsed.pathname.replace(/\/+$/, "");
  for (const suffix of SUFFIXES) {
    if (path.endsWith(suffix)) {
      path = path.slice(0, -suffix.length);
      break;
    }
  }
  const secure = parsed.protocol === "https:" || parsed.protocol === "wss:";
  return { secure, host: parsed.host, path };
}

/** `ws(s)://HOST/v1/realtime?model=...` for the WebSocket transport. */
export function realtimeWebSocketUrl(url, model) {
  const { secure, host, path } = serverBase(url);
  const out = new URL(`${secure ? "wss" : "ws"}://${host}${path}/v1/realtime`);
  if (model) out.searchParams.set("model", model);
  return out.toString();
}

/** `http(s)://HOST/v1/realtime/calls` for the WebRTC SDP exchange. */
export function realtimeCallsUrl(url) {
  const { secure, host, path } = serverBase(url);
  return `${secure ? "https" : "http"}://${host}${path}/v1/realtime/calls`;
}

// RFC 6455 subprotocols are HTTP tokens: visible ASCII without separators.
const TOKEN_RE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/**
 * WebSocket subprotocols: `realtime`, plus the key as `openai-insecure-api-key.<key>` (browsers
 * cannot set an Authorization header on a WebSocket). "Insecure" because the key is visible to
 * the page: use a key meant for the browser.
 */
export function websocketProtocols(apiKey) {
  if (!apiKey) return ["realtime"];
  if (typeof apiKey !== "string" || !TOKEN_RE.test(apiKey)) {
    throw new TypeError("apiKey must be visible ASCII without spaces or separators to travel as a WebSocket subprotocol");
  }
  return ["realtime", `openai-insecure-api-key.${apiKey}`];
}
