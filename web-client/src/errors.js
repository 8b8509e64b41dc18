// Switchboard SDK: the error type every part throws, and a timeout for promises that may never
// settle.

/** An error carrying a protocol error code (`name_taken`, `unauthorized`, ...). */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {string} [requestType]
   */
  constructor(code, message, requestType) {
    super(message);
    this.name = 'SwitchboardError';
    this.code = code;
    this.requestType = requestType;
  }
}

/**
 * `promise`, or a rejection after `ms`.
 * @template T
 * @param {Promise<T>} promise
 * @param {number} ms
 * @param {string} what
 * @returns {Promise<T>}
 */
export function withTimeout(promise, ms, what) {
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const timeout = new Promise((_resolve, reject) => {
    timer = setTimeout(() => reject(new SwitchboardError('timeout', `${what} took over ${ms / 1000} s`)), ms);
  });
  return /** @type {Promise<T>} */ (Promise.race([promise, timeout])).finally(() => clearTimeout(timer));
}
