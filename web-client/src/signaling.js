// Switchboard SDK: the signaling socket. Opening it (with a token fetched over HTTP), sending,
// and handling incoming messages one at a time in arrival order; retrying for a while after
// the server was lost.

import { SwitchboardError, withTimeout } from './errors.js';

/** How long opening the signaling socket or fetching a token may take. */
const SOCKET_OPEN_TIMEOUT_MS = 5000;
/**
 * The longest one incoming message may hold up the next. A peer connection closed while one of
 * its operations is in flight never settles that operation's promise (as the WebRTC spec says).
 */
const HANDLER_TIMEOUT_MS = 10_000;
/** Refusals a retry cannot fix. */
export const FATAL_CODES = ['name_taken', 'room_full', 'unauthorized', 'bad_request'];

/**
 * @typedef {object} SocketHandlers
 * @property {(msg: any) => Promise<void> | void} message  one parsed message; the next waits for it
 * @property {(ev: CloseEvent) => void} closed  the current socket closed
 * @property {(type: string, err: unknown) => void} failed  handling a message threw or timed out
 * @property {() => void} invalid  the server sent something that is not JSON
 */

/**
 * @typedef {object} Grants  What a token allows in its room (docs/protocol.md, section 1).
 * @property {boolean} publish  send camera, microphone and screen
 * @property {boolean} subscribe  receive the others' media
 * @property {boolean} roomAdmin
 * @property {boolean} roomList
 * @property {boolean} lobby  be seen online and call others (section 12)
 */

/**
 * What `token` grants, read from its payload (anyone holding a token can read it; only the server
 * checks its signature), or null when it is not a token. Missing grants are the defaults.
 * @param {string} token
 * @returns {Grants | null}
 */
export function tokenGrants(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')));
    return grantsOf(claims.grants);
  } catch {
    return null;
  }
}

/**
 * Grants as the server sends them (`joined.grants`, a token's `grants`), with defaults filled in.
 * @param {any} grants
 * @returns {Grants}
 */
export function grantsOf(grants) {
  return {
    publish: grants?.publish !== false,
    subscribe: grants?.subscribe !== false,
    roomAdmin: grants?.roomAdmin === true,
    roomList: grants?.roomList === true,
    lobby: grants?.lobby === true,
  };
}

export class SignalingSocket {
  /** @type {WebSocket | null} */ #ws = null;
  /** Incoming messages are handled one at a time, in arrival order. @type {Promise<unknown>} */
  #queue = Promise.resolve();
  /** @type {SocketHandlers} */ #on;

  /** @param {SocketHandlers} handlers */
  constructor(handlers) {
    this.#on = handlers;
  }

  /**
   * Opens a socket to `base` with `token`, in place of any earlier one.
   * @param {URL} base
   * @param {string} token
   */
  open(base, token) {
    const url = new URL('/ws/signal', base);
    url.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('token', token);
    const ws = new WebSocket(url);
    this.#ws = ws;
    return new Promise((resolve, reject) => {
      // A black-holed network would otherwise leave this pending past any deadline.
      const timer = setTimeout(() => {
        reject(new SwitchboardError('unreachable', `no answer from ${url.origin}/ws/signal`));
        if (ws.readyState === WebSocket.CONNECTING) ws.close();
      }, SOCKET_OPEN_TIMEOUT_MS);
      ws.addEventListener('open', () => clearTimeout(timer));
      ws.addEventListener('close', () => clearTimeout(timer));
      ws.onopen = () => resolve(undefined);
      ws.onerror = () => reject(new SwitchboardError('socket', `cannot open ${url.origin}/ws/signal`));
      ws.onclose = (ev) => {
        reject(new SwitchboardError('socket', `signaling socket closed (${ev.code})`));
        if (this.#ws === ws) this.#on.closed(ev);
      };
      ws.onmessage = (ev) => {
        if (this.#ws !== ws) return;
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          this.#on.invalid();
          return;
        }
        this.#queue = this.#queue
          // A message of a socket replaced since (a reconnect) is about a session that is gone.
          .then(() => (this.#ws === ws ? withTimeout(Promise.resolve(this.#on.message(msg)), HANDLER_TIMEOUT_MS, `handling \`${msg?.type}\``) : undefined))
          .catch((err) => this.#on.failed(msg?.type ?? 'message', err));
      };
    });
  }

  /** @param {object} msg */
  send(msg) {
    if (this.#ws?.readyState === WebSocket.OPEN) this.#ws.send(JSON.stringify(msg));
  }

  /**
   * Lets go of the current socket: no more of its events, and it is closed. Messages still
   * queued are dropped: a handler may be awaiting a connection closed meanwhile, whose promise
   * then never settles, and a new session's messages must not queue behind it.
   * @param {number} [code]  a close code to send (1000 when leaving)
   */
  drop(code) {
    this.#queue = Promise.resolve();
    const ws = this.#ws;
    this.#ws = null;
    if (!ws) return;
    ws.onclose = ws.onmessage = ws.onerror = null;
    if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(code);
  }
}

/**
 * A token from the server's `/auth/token` (the development posture mints them for anyone).
 * @param {URL} base
 * @param {string} userId
 * @param {string} room
 * @param {Partial<Grants>} [grants]  what to ask for beyond the defaults (`{lobby: true}`)
 * @returns {Promise<string>}
 */
export async function fetchToken(base, userId, room, grants) {
  /** @type {Response} */
  let res;
  try {
    res = await fetch(new URL('/auth/token', base), {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(grants ? { userId, room, grants } : { userId, room }),
      signal: AbortSignal.timeout(SOCKET_OPEN_TIMEOUT_MS),
    });
  } catch (err) {
    throw new SwitchboardError('unreachable', `cannot reach ${base.origin} (${err instanceof Error ? err.message : err})`);
  }
  const body = await res.json().catch(() => null);
  if (!res.ok || typeof body?.token !== 'string') {
    // A proxy's 502/503 while the server restarts is worth retrying; a 4xx is not.
    const code = body?.error?.code ?? (res.status === 401 ? 'unauthorized' : res.status >= 500 ? 'unreachable' : 'bad_request');
    throw new SwitchboardError(code, body?.error?.message ?? `token request failed (${res.status})`);
  }
  return body.token;
}

/**
 * Calls `attempt` with backoff (250 ms doubling to 2 s) until it succeeds, `stopped()` turns
 * true, a refusal no retry can fix, or `windowMs` has passed.
 * @param {number} windowMs
 * @param {(deadline: number) => Promise<void>} attempt  given the deadline (ms since the epoch)
 * @param {() => boolean} stopped
 * @param {(err: unknown) => void} failedOnce  after each failed attempt
 * @returns {Promise<{ok: true} | {ok: false, stopped: boolean, error: string}>}
 */
export async function retryFor(windowMs, attempt, stopped, failedOnce) {
  const deadline = Date.now() + windowMs;
  let error = '';
  for (let n = 0; Date.now() < deadline; n++) {
    await new Promise((r) => setTimeout(r, Math.min(250 * 2 ** n, 2000)));
    if (stopped()) return { ok: false, stopped: true, error };
    try {
      await attempt(deadline);
      return { ok: true };
    } catch (err) {
      error = err instanceof Error ? err.message : String(err);
      failedOnce(err);
      if (stopped()) return { ok: false, stopped: true, error };
      // `name_taken` is not final here: an earlier attempt that was seated may hold the name
      // until the server notices it is gone.
      if (err instanceof SwitchboardError && FATAL_CODES.includes(err.code) && err.code !== 'name_taken') break;
    }
  }
  return { ok: false, stopped: false, error };
}
