/**
 * Why a connection failed, asked of the server over plain HTTP. A browser reports a refused
 * WebSocket handshake (401: no key, a wrong or expired one) exactly as it reports a server that
 * is down (close code 1006, no status, no body), and a page whose server went away fails first on
 * loading an audio worklet; `GET /v1/realtime` with the same key tells these apart.
 */

import { serverBase } from "./urls.js";

export const DIAGNOSE_TIMEOUT_MS = 5000;
const DETAIL_MAX_CHARS = 200;

/** A failure to connect that the server explained: `code` is `invalid_api_key` (with `status`
 * 401) or `server_unreachable` (no `status`). */
export class ConnectionError extends Error {
  constructor(message, { code, status = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "ConnectionError";
    this.code = code;
    this.status = status;
  }
}

/** `http(s)://HOST/v1/realtime`: where `GET` says whether a key opens a session. */
export function realtimeHttpUrl(url) {
  const { secure, host, path } = serverBase(url);
  return `${secure ? "https" : "http"}://${host}${path}/v1/realtime`;
}

/** The reason in a failed reply: JSON `{error: {message}}` or `{detail}`, plain text, or the
 * status text for an HTML error page. */
export function replyDetail(res, text) {
  let detail = text;
  try {
    const body = JSON.parse(text);
    detail = body?.error?.message ?? (typeof body?.detail === "string" ? body.detail : JSON.stringify(body?.detail ?? body));
  } catch {
    if (/^\s*</.test(text)) detail = res.statusText;
  }
  detail = String(detail ?? "").replace(/\s+/g, " ").trim();
  return detail.length > DETAIL_MAX_CHARS ? `${detail.slice(0, DETAIL_MAX_CHARS)}…` : detail;
}

/**
 * Ask the server at `url` whether `apiKey` opens a session: resolves to a ConnectionError saying
 * what is wrong (the key refused, nothing answering), or null when the server answers and takes
 * the key (then the original error stands).
 */
export async function diagnose(url, apiKey, { fetch: fetchImpl = globalThis.fetch?.bind(globalThis), timeoutMs = DIAGNOSE_TIMEOUT_MS } = {}) {
  if (!fetchImpl) return null;
  const target = realtimeHttpUrl(url);
  let res;
  try {
    res = await fetchImpl(target, {
      headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {},
      cache: "no-store",
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    const origin = new URL(target).origin;
    return new ConnectionError(
      `cannot reach the server at ${origin}: nothing answered (is \`mimo-agent serve\` running there, and does it let this page's origin in? see --cors-origin)`,
      { code: "server_unreachable", cause: err },
    );
  }
  if (res.status !== 401 && res.status !== 403) return null;
  const text = await res.text().catch(() => "");
  let code = "invalid_api_key";
  try {
    code = JSON.parse(text)?.error?.code ?? code;
  } catch {
    // not JSON: keep the generic code
  }
  const detail = replyDetail(res, text);
  return new ConnectionError(`the server refused the ${apiKey ? "API key" : "connection without an API key"} (HTTP ${res.status} ${code})${detail ? `: ${detail}` : ""}`, {
    code,
    status: res.status,
  });
}
