// The HTTP JSON API of docs/web-api.md: fetch with the page's token, and errors as ApiError.

const token = new URLSearchParams(location.search).get("token") || "";

/** An API (or network) error: the gRPC code name, the message and any field violations. */
export class ApiError extends Error {
  constructor(status, body, text) {
    const err = (body && body.error) || {};
    const message = err.message || (text && text.slice(0, 200)) || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = err.code || (status ? `HTTP_${status}` : "UNAVAILABLE");
    this.reason = err.reason || "";
    this.fieldViolations = Array.isArray(err.field_violations) ? err.field_violations : [];
  }
}

/** Call ``method path`` with an optional JSON body; the parsed JSON answer, or throws ApiError. */
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (exc) {
    throw new ApiError(0, { error: { code: "UNAVAILABLE", message: `cannot reach the server (${exc.message})` } });
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, data, text);
  return data;
}

/** ``url`` with ``?token=`` when the page has one (for <img> and EventSource, which send no headers). */
export function withToken(url) {
  if (!token) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

export const enc = encodeURIComponent;
