# Shared helpers for the benchmark scripts (sourced).

# median "N N N ...": the median of whitespace-separated integers.
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }

# ratio A B: A/B with two or three decimals.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {printf "%.*f", d, a/b}'; }
