//! Rate limits: GCRA budgets counted in the node's memory or in Redis.
