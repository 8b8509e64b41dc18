// Switchboard SDK: how large each remote video is shown. The elements the app shows a
// participant's video in are watched (ResizeObserver), and sizes the app sets itself count too;
// through the server, each video subscription is then given the largest, in device pixels
// (`view`), and the server forwards the smallest of the publisher's simulcast layers that
// covers it. A growth goes out at once, a shrink once it has held for a moment; nothing is sent
// twice, and everything again on a new subscribe connection (the server forgets with it).

/** @typedef {import('./client.js').Source} Source */
/** @typedef {import('./client.js').Subscription} Subscription */

/** A smaller size is sent once it has held this long: a tile shrinking in steps costs one message. */
const SHRINK_DELAY_MS = 500;
/** Sizes for one publication go out at most this often (a window being dragged larger). */
const VIEW_SPACING_MS = 200;
/**
 * All `view`s together stay within this budget (a burst, then so many a second): the server
 * counts them with `pause` and `mute` against 100 and 20 a second, and drops what is over.
 */
const VIEW_BURST = 40;
const VIEW_PER_SECOND = 10;
/** After the server dropped a `view` (rate_limited), everything is told again this much later. */
const REFUSED_RETRY_MS = 1000;
/** The protocol's bounds for `view` sizes, in device pixels. */
const MAX_VIEW_PX = 16384;

/**
 * @typedef {object} ViewSize  in device pixels
 * @property {number} width
 * @property {number} height
 *
 * @typedef {object} Observed  one watched element
 * @property {string} key  `peerId|source` of the video it shows
 * @property {ViewSize | null} size  its latest size; null until measured, or when not rendered
 *
 * @typedef {object} Sent  what the server was told about one publication, and what waits
 * @property {ViewSize | null} size
 * @property {number} at  performance.now() when sent
 * @property {ViewSize | null} shrinkTo  a smaller size waiting for SHRINK_DELAY_MS
 * @property {number} shrinkSince
 * @property {ReturnType<typeof setTimeout> | null} timer
 *
 * What the views need of the room.
 * @typedef {object} ViewContext
 * @property {(msg: object) => void} send
 * @property {() => boolean} joined
 * @property {() => RTCPeerConnection | null} subscribePc  the server forgets sizes with it
 * @property {() => Iterable<Subscription>} subscriptions  its sections
 */

export class VideoViews {
  /** Watched elements. @type {Map<Element, Observed>} */
  #observed = new Map();
  /** Sizes the app set itself, by `peerId|source`. @type {Map<string, ViewSize>} */
  #manual = new Map();
  /** By publicationId, for the current subscribe connection. @type {Map<string, Sent>} */
  #sent = new Map();
  /** The subscribe connection `#sent` is about. @type {RTCPeerConnection | null} */
  #connection = null;
  /** @type {ResizeObserver | null} */ #resize = null;
  /** `view`s that may be sent now, and when the budget was last topped up. */
  #budget = { tokens: VIEW_BURST, at: 0 };
  /** A sync waiting for the budget (or a retry). @type {ReturnType<typeof setTimeout> | null} */
  #later = null;
  /** @type {ViewContext} */ #ctx;

  /** @param {ViewContext} ctx */
  constructor(ctx) {
    this.#ctx = ctx;
  }

  /**
   * Watches `element`, which shows `peerId`'s `source` video (in place of what it showed before).
   * @param {Element} element
   * @param {string} peerId
   * @param {Source} source
   */
  observe(element, peerId, source) {
    const key = `${peerId}|${source}`;
    const existing = this.#observed.get(element);
    if (existing) {
      if (existing.key === key) return;
      existing.key = key;
      this.sync();
      return;
    }
    this.#observed.set(element, { key, size: null });
    const observer = this.#observer();
    try {
      // Also told when only the zoom or the screen's pixel density changes.
      observer.observe(element, { box: 'device-pixel-content-box' });
    } catch {
      observer.observe(element);
    }
  }

  /** @param {Element} element */
  unobserve(element) {
    if (!this.#observed.delete(element)) return;
    this.#resize?.unobserve(element);
    this.sync();
  }

  /**
   * A size the app shows `peerId`'s `source` video at, besides any watched element; 0 forgets it.
   * @param {string} peerId
   * @param {Source} source
   * @param {number} width  device pixels
   * @param {number} height
   */
  setSize(peerId, source, width, height) {
    const key = `${peerId}|${source}`;
    if (!(width > 0 && height > 0)) this.#manual.delete(key);
    else this.#manual.set(key, { width: clampPx(width), height: clampPx(height) });
    this.sync();
  }

  /** The server dropped a `view` (over its rate): tell it everything again in a moment. */
  refused() {
    this.#forget();
    this.#syncIn(REFUSED_RETRY_MS);
  }

  /** Tells the server what changed, as far as it may be told now. */
  sync() {
    const pc = this.#ctx.subscribePc();
    if (pc !== this.#connection) {
      this.#connection = pc;
      this.#forget();
    }
    if (!pc || pc.connectionState === 'closed' || !this.#ctx.joined()) return;
    const wanted = this.#wanted();
    const now = performance.now();
    for (const sub of this.#ctx.subscriptions()) {
      if (sub.kind !== 'video') continue;
      const size = wanted.get(`${sub.peerId}|${sub.source}`);
      let sent = this.#sent.get(sub.publicationId);
      if (!sent) {
        sent = { size: null, at: -Infinity, shrinkTo: null, shrinkSince: 0, timer: null };
        this.#sent.set(sub.publicationId, sent);
      }
      // Unknown (nothing shows it, or nothing rendered yet): the server keeps what it was told.
      if (!size || sameSize(size, sent.size)) {
        sent.shrinkTo = null;
        clearPending(sent);
        continue;
      }
      const grows = !sent.size || size.width > sent.size.width || size.height > sent.size.height;
      let due = sent.at + VIEW_SPACING_MS;
      if (grows) sent.shrinkTo = null;
      else {
        if (!sameSize(size, sent.shrinkTo)) {
          sent.shrinkTo = size;
          sent.shrinkSince = now;
        }
        due = Math.max(due, sent.shrinkSince + SHRINK_DELAY_MS);
      }
      clearPending(sent);
      if (now < due) {
        sent.timer = setTimeout(() => this.sync(), Math.ceil(due - now) + 1);
        continue;
      }
      if (!this.#spend(now)) {
        // Over budget: this one and the rest wait for the next token.
        this.#syncIn((1000 / VIEW_PER_SECOND) * (1 - this.#budget.tokens));
        break;
      }
      sent.size = size;
      sent.at = now;
      sent.shrinkTo = null;
      this.#ctx.send({ type: 'view', publicationId: sub.publicationId, width: size.width, height: size.height });
    }
    const subscribed = new Set(Array.from(this.#ctx.subscriptions(), (sub) => sub.publicationId));
    for (const [publicationId, sent] of [...this.#sent]) {
      if (subscribed.has(publicationId)) continue;
      clearPending(sent);
      this.#sent.delete(publicationId);
    }
  }

  /** Stops watching everything (the room is closed). */
  stop() {
    this.#resize?.disconnect();
    this.#resize = null;
    this.#observed.clear();
    this.#manual.clear();
    this.#forget();
  }

  /** Forgets what the server was told (a new subscribe connection, or none). */
  #forget() {
    for (const sent of this.#sent.values()) clearPending(sent);
    this.#sent.clear();
    if (this.#later) clearTimeout(this.#later);
    this.#later = null;
  }

  /**
   * Takes one `view` from the budget.
   * @param {number} now  performance.now()
   * @returns {boolean}  false when it is spent
   */
  #spend(now) {
    const budget = this.#budget;
    budget.tokens = Math.min(VIEW_BURST, budget.tokens + ((now - budget.at) / 1000) * VIEW_PER_SECOND);
    budget.at = now;
    if (budget.tokens < 1) return false;
    budget.tokens -= 1;
    return true;
  }

  /** @param {number} ms */
  #syncIn(ms) {
    if (this.#later) return;
    this.#later = setTimeout(() => {
      this.#later = null;
      this.sync();
    }, Math.ceil(ms) + 1);
  }

  /** @returns {Map<string, ViewSize>}  the largest size each video is shown at, by `peerId|source` */
  #wanted() {
    /** @type {Map<string, ViewSize>} */
    const out = new Map(this.#manual);
    for (const [element, { key, size }] of this.#observed) {
      if (!size || !element.isConnected) continue;
      const best = out.get(key);
      if (!best || size.width * size.height > best.width * best.height) out.set(key, size);
    }
    return out;
  }

  #observer() {
    this.#resize ??= new ResizeObserver((entries) => {
      for (const entry of entries) {
        const observed = this.#observed.get(entry.target);
        if (observed) observed.size = deviceSize(entry);
      }
      this.sync();
    });
    return this.#resize;
  }
}

/**
 * @param {ResizeObserverEntry} entry
 * @returns {ViewSize | null}  null when the element is not rendered (no box, or an empty one)
 */
function deviceSize(entry) {
  // CSS pixels times devicePixelRatio, as the protocol says. (devicePixelContentBoxSize would
  // snap to the device's pixel grid, but emulated screens, as in tests, leave it at CSS pixels.)
  const width = entry.contentRect.width * devicePixelRatio;
  const height = entry.contentRect.height * devicePixelRatio;
  if (!(width >= 1 && height >= 1)) return null;
  return { width: clampPx(width), height: clampPx(height) };
}

/** @param {number} px */
function clampPx(px) {
  return Math.min(MAX_VIEW_PX, Math.max(1, Math.round(px)));
}

/**
 * @param {ViewSize | null} a
 * @param {ViewSize | null} b
 */
function sameSize(a, b) {
  return !!a && !!b && a.width === b.width && a.height === b.height;
}

/** @param {Sent} sent */
function clearPending(sent) {
  if (sent.timer) clearTimeout(sent.timer);
  sent.timer = null;
}
