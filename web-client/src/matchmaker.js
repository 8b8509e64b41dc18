// Switchboard SDK: meeting a stranger (docs/protocol.md, section 13). Wait in the server's queue
// until someone else does; a match hands each side a room and a token to join it with a Room.
//
//   const finder = new Matchmaker();
//   finder.on('matched', ({ name, room, token }) => new Room().connect(url, { room, name: me, token }));
//   finder.on('partnerLeft', () => room.leave());        // then finder.find() looks again
//   await finder.find(location.origin, { name: 'Ann' }); // waits; finder.next(), finder.stop()
//
// A waiting place outlives a dropped socket for 30 s: the SDK reconnects by itself within that
// window and takes it back.

import { Emitter } from './emitter.js';
import { SwitchboardError } from './errors.js';
import { SignalingSocket, fetchToken, retryFor } from './signaling.js';

/** How long the server keeps a dropped client's place; the SDK tries a little less. */
const RESUME_WINDOW_MS = 25_000;

/**
 * @typedef {object} MatchOptions
 * @property {string} name  the name your partner sees; also the userId of a minted token
 * @property {string} [token]  a token your backend minted with the `lobby` grant
 *
 * @typedef {object} Match
 * @property {string} partner  the partner's id in the queue
 * @property {string} name  the partner's name
 * @property {string} room
 * @property {string} token
 */

/** A place in the waiting queue. */
export class Matchmaker extends Emitter {
  /** @type {'new' | 'waiting' | 'matched' | 'idle' | 'reconnecting' | 'closed'} */ state = 'new';
  /** The current partner. @type {Match | null} */ match = null;
  /** People waiting before you. */ position = 0;
  /** @type {{base: URL, name: string, token?: string} | null} */ #session = null;
  /** The secret that takes the place back after a reconnect. */ #resume = '';
  /** A `stop` was sent and not yet answered. */ #stopping = false;
  #socket = new SignalingSocket({
    message: (msg) => this.#handle(msg),
    closed: () => this.#lost(),
    failed: (type, err) => console.error(`switchboard: handling \`${type}\` failed`, err),
    invalid: () => console.error('switchboard: the server sent something that is not JSON'),
  });
  /** Resolves the wait for `waiting` (the first, or after a reconnect), or for a `redirect`. @type {((ok: boolean, err?: Error, redirect?: string) => void) | null} */
  #answered = null;

  /**
   * Looks for a partner: the first time it opens the queue socket, later (after a match or a
   * stop) it looks again on it. Resolves once waiting.
   * @param {string} serverUrl
   * @param {MatchOptions} options
   */
  async find(serverUrl, { name, token }) {
    if (this.state === 'closed') throw new Error('this Matchmaker was closed');
    if (this.#session) {
      if (this.state === 'waiting') return;
      await this.#ask({ type: 'find_partner' });
      return;
    }
    const base = new URL(serverUrl);
    this.#session = { base, name, token };
    try {
      await this.#open();
    } catch (err) {
      this.#session = null;
      this.state = 'new';
      throw err;
    }
  }

  /** Leaves the partner and looks again (`waiting` follows). */
  next() {
    if (this.state !== 'matched' && this.state !== 'idle') return;
    this.#socket.send({ type: 'next' });
  }

  /** Stops looking (leaves the queue, or the partner). */
  stop() {
    if (this.state !== 'waiting' && this.state !== 'matched') return;
    this.match = null;
    this.state = 'idle';
    // A `matched` already on its way is stale: ignored until the server's `queue_left`.
    this.#stopping = true;
    this.#socket.send({ type: 'stop' });
  }

  /** Leaves the queue for good and closes its socket. */
  close() {
    if (this.state === 'closed') return;
    this.#socket.send({ type: 'leave' });
    this.state = 'closed';
    this.#socket.drop(1000);
  }

  async #open() {
    const session = /** @type {{base: URL, name: string, token?: string}} */ (this.#session);
    const token = session.token ?? (await fetchToken(session.base, session.name, 'strangers', { lobby: true }));
    let node = session.base;
    // In a cluster, one node hosts the queue: `redirect` says which (3 hops at most).
    for (let hops = 0; ; hops++) {
      await this.#socket.open(node, token);
      const redirect = await this.#ask({ type: 'find_partner', name: session.name, ...(this.#resume ? { resume: this.#resume } : {}) });
      if (!redirect) return;
      if (hops >= 3) throw new SwitchboardError('redirect', `more than 3 redirects, the last to ${redirect}`);
      node = new URL(redirect, session.base);
    }
  }

  /**
   * Sends `msg` and waits for `waiting` (or the `error` answering it); resolves with the URL of
   * a `redirect` instead (cluster).
   * @param {object} msg
   * @returns {Promise<string | undefined>}
   */
  #ask(msg) {
    return new Promise((resolve, reject) => {
      this.#answered = (ok, err, redirect) => (ok ? resolve(redirect) : reject(err));
      this.#socket.send(msg);
    });
  }

  /** @param {any} msg */
  #handle(msg) {
    switch (msg.type) {
      case 'redirect':
        // (cluster) the queue lives on another node: `#open` goes there.
        if (!this.#answered) break;
        this.#socket.drop(1000);
        this.#answered(true, undefined, String(msg.url));
        this.#answered = null;
        break;
      case 'waiting':
        this.#stopping = false;
        this.match = null;
        this.#resume = msg.resume;
        this.position = msg.position;
        this.state = 'waiting';
        this.#answered?.(true);
        this.#answered = null;
        this.emit('waiting', { position: msg.position });
        break;
      case 'matched':
        if (this.#stopping) break;
        this.match = { partner: msg.partner, name: msg.name, room: msg.room, token: msg.token };
        this.state = 'matched';
        this.emit('matched', this.match);
        break;
      case 'partner_left':
        if (this.match?.partner !== msg.partner) break;
        this.match = null;
        this.state = 'idle';
        this.emit('partnerLeft', { partner: msg.partner });
        break;
      case 'queue_left':
        this.#stopping = false;
        this.match = null;
        this.state = 'idle';
        this.emit('stopped', { reason: msg.reason });
        break;
      case 'error': {
        const err = new SwitchboardError(msg.code, msg.message, msg.requestType);
        if (this.#answered && msg.requestType === 'find_partner') {
          this.#answered(false, err);
          this.#answered = null;
        } else {
          this.emit('error', { code: msg.code, message: msg.message, requestType: msg.requestType });
        }
        break;
      }
      default:
        break;
    }
  }

  /** The socket dropped: a waiting place is taken back within the resume window. */
  async #lost() {
    this.#answered?.(false, new SwitchboardError('socket', 'the queue connection closed'));
    this.#answered = null;
    // A failed attempt of the reconnect below: it tries again by itself.
    if (this.state === 'closed' || this.state === 'reconnecting') return;
    const wasWaiting = this.state === 'waiting';
    // A match ends with the socket (the partner is told); the room itself carries on.
    if (this.match) this.emit('partnerLeft', { partner: this.match.partner });
    this.match = null;
    if (!wasWaiting) {
      this.state = 'closed';
      this.emit('disconnected', { reason: 'socket' });
      return;
    }
    this.state = 'reconnecting';
    this.emit('reconnecting', undefined);
    const result = await retryFor(
      RESUME_WINDOW_MS,
      () => this.#open(),
      () => this.state === 'closed',
      () => this.#socket.drop(),
    );
    if (result.ok) this.emit('reconnected', undefined);
    else if (!result.stopped) {
      this.state = 'closed';
      this.emit('disconnected', { reason: 'socket' });
    }
  }
}
